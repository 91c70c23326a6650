"""Client partitioners and the partitioned Parquet store."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fedsim.errors import UsageError
from fedsim.partition import (
    PARTITION_SCHEMES,
    label_counts,
    partition,
    read_clients,
    write_partitioned,
)

SST2_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "train.tsv"


def labels_of(n=6000, num_labels=3, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    return rng.choice(num_labels, size=n, p=weights).astype(np.int64)


def counts_matrix(client_ids, labels, num_clients, num_labels):
    t = label_counts(client_ids, labels, num_clients, num_labels)
    return np.asarray(t.column("count").to_pylist()).reshape(num_clients, num_labels)


def mean_max_share(client_ids, labels, num_clients, num_labels):
    m = counts_matrix(client_ids, labels, num_clients, num_labels)
    return float((m.max(1) / m.sum(1)).mean())


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 3, 7, 64])
def test_every_example_assigned_once_and_no_client_empty(scheme, num_clients):
    labels = labels_of(3000, num_labels=4)
    client_ids = partition(labels, num_clients, scheme, alpha=0.3, seed=1)
    assert client_ids.dtype == np.int64 and client_ids.shape == labels.shape
    assert client_ids.min() >= 0 and client_ids.max() < num_clients
    assert np.bincount(client_ids, minlength=num_clients).min() >= 1
    assert counts_matrix(client_ids, labels, num_clients, 4).sum(0).tolist() == np.bincount(labels, minlength=4).tolist()


@pytest.mark.parametrize("n,num_clients", [(1000, 7), (10, 10), (12_345, 100)])
def test_iid_sizes_differ_by_at_most_one(n, num_clients):
    sizes = np.bincount(partition(labels_of(n), num_clients, "iid", seed=3), minlength=num_clients)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = labels_of(10_000, num_labels=5)
    shares = [mean_max_share(partition(labels, 20, "dirichlet", alpha=a, seed=0), labels, 20, 5) for a in (0.05, 0.5, 100.0)]
    assert shares[0] > shares[1] > shares[2]
    assert shares[0] > 0.8 and shares[2] < 0.3  # near one label per client vs near the global mix (max 0.2+)


def test_dirichlet_min_size_with_tiny_alpha_and_many_clients():
    labels = labels_of(2000, num_labels=10)
    client_ids = partition(labels, 200, "dirichlet", alpha=0.01, seed=5, min_size=5)  # resampling cannot succeed: repair
    assert np.bincount(client_ids, minlength=200).min() >= 5
    assert np.array_equal(client_ids, partition(labels, 200, "dirichlet", alpha=0.01, seed=5, min_size=5))


def test_imbalanced_dominant_share_exact_when_balanced():
    labels = np.repeat(np.arange(3), 2000)  # balanced, 6 clients: 2 per label
    client_ids = partition(labels, 6, "imbalanced", seed=0, dominant_share=0.7)
    m = counts_matrix(client_ids, labels, 6, 3)
    assert m.sum(1).tolist() == [1000] * 6
    for client in range(6):
        dominant = client % 3
        assert m[client, dominant] == 700  # 0.7 of 2000, split between the 2 owners
        assert sorted(np.delete(m[client], dominant).tolist()) == [150, 150]  # the rest spread evenly


def test_imbalanced_on_sst2_labels_three_clients():
    if not SST2_TRAIN.is_file():
        pytest.skip(f"{SST2_TRAIN} is absent: the real data sets are not shipped with the project")
    from workloads import load_workload

    labels = load_workload("sst2", path=str(SST2_TRAIN.parent)).train_labels
    client_ids = partition(labels, 3, "imbalanced", seed=0)  # the paper's setting: 3 clients
    m = counts_matrix(client_ids, labels, 3, 2)
    assert m.argmax(1).tolist() == [0, 1, 0]  # client i dominated by label i mod 2
    shares = m.max(1) / m.sum(1)
    assert np.allclose(shares, [0.760, 0.835, 0.760], atol=0.005)  # skewed labels (44/56) move the 0.8 share
    assert m[1, 1] == int(0.8 * (labels == 1).sum())  # client 1 owns 80% of label 1


def test_imbalanced_more_labels_than_clients():
    labels = np.repeat(np.arange(5), 100)
    m = counts_matrix(partition(labels, 2, "imbalanced", dominant_share=0.9), labels, 2, 5)
    assert m[:, 0].tolist() == [90, 10] and m[:, 1].tolist() == [10, 90]
    assert m[:, 2:].tolist() == [[50, 50, 50], [50, 50, 50]]  # labels no client is dominated by: split evenly


@pytest.mark.parametrize("bad", [0.2, 0.5, 1.2, 0])
def test_imbalanced_share_validated(bad):
    with pytest.raises(UsageError, match=r"^clients\.dominant_share: must be in \(1/num_labels, 1\] = \(0\.5, 1\] for 2 labels"):
        partition(labels_of(100, num_labels=2), 3, "imbalanced", dominant_share=bad)


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_seeded(scheme):
    labels = labels_of(5000, num_labels=3)
    a = partition(labels, 10, scheme, seed=11)
    assert np.array_equal(a, partition(labels, 10, scheme, seed=11))
    assert not np.array_equal(a, partition(labels, 10, scheme, seed=12))


def test_errors_name_the_field():
    labels = labels_of(120)
    with pytest.raises(UsageError) as e:
        partition(labels, 500, "iid")
    assert str(e.value) == "clients.count: 500 clients but only 120 training examples; use at most 120"
    with pytest.raises(UsageError, match=r"^clients\.count: 50 clients with at least 5 each but only 120 training examples; use at most 24$"):
        partition(labels, 50, "dirichlet", min_size=5)
    with pytest.raises(UsageError) as e:
        partition(labels, 3, "dirichlet", alpha=0)
    assert str(e.value) == "clients.alpha: must be > 0, got 0"
    with pytest.raises(UsageError, match=r"^clients\.alpha: must be > 0, got -1\.0$"):
        partition(labels, 3, "dirichlet", alpha=-1.0)
    with pytest.raises(UsageError) as e:
        partition(labels, 3, "pathological")
    assert str(e.value) == "clients.partition: unknown scheme 'pathological'; valid: iid, dirichlet, imbalanced"
    with pytest.raises(UsageError, match=r"^clients\.count: must be a positive integer, got 0$"):
        partition(labels, 0, "iid")


def test_label_counts_table():
    client_ids = np.array([0, 0, 2, 2, 2])
    labels = np.array([1, 1, 0, 1, 1])
    t = label_counts(client_ids, labels, num_clients=3, num_labels=2)
    assert t.column_names == ["client_id", "label", "count"]
    assert t.to_pylist() == [
        {"client_id": 0, "label": 0, "count": 0},
        {"client_id": 0, "label": 1, "count": 2},
        {"client_id": 1, "label": 0, "count": 0},
        {"client_id": 1, "label": 1, "count": 0},
        {"client_id": 2, "label": 0, "count": 1},
        {"client_id": 2, "label": 1, "count": 2},
    ]


def test_write_and_read_clients_round_trip(tmp_path):
    n = 5000
    labels = labels_of(n, num_labels=3)
    table = pa.table({"text": [f"example {i}" for i in range(n)], "text_pair": pa.nulls(n, pa.string()), "label": labels})
    client_ids = partition(labels, 40, "dirichlet", alpha=0.5, seed=2)
    path = tmp_path / "parts" / "train.parquet"
    write_partitioned(table, client_ids, str(path), rows_per_group=256)

    asked = [17, 3, 39]
    got = read_clients(str(path), asked)
    expected_rows = [i for c in sorted(asked) for i in np.flatnonzero(client_ids == c)]  # client, then original order
    assert got.column("example_id").to_pylist() == expected_rows
    assert got.column("client_id").to_pylist() == client_ids[expected_rows].tolist()
    assert got.select(table.column_names).equals(table.take(pa.array(expected_rows, pa.int64())))

    everything = read_clients(str(path), list(range(40)))
    assert everything.num_rows == n and sorted(everything.column("example_id").to_pylist()) == list(range(n))
    assert read_clients(str(path), []).num_rows == 0

    # sorted by client_id, so one client's rows lie in few row groups and the others can be skipped
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // 256)
    fragment = next(ds.dataset(path).get_fragments())
    hit = fragment.split_by_row_group(filter=ds.field("client_id") == 17)
    assert 1 <= len(list(hit)) <= 2


def test_read_clients_of_an_empty_client(tmp_path):
    table = pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    write_partitioned(table, np.array([0, 2, 0]), str(tmp_path / "p.parquet"))
    empty = read_clients(str(tmp_path / "p.parquet"), [1])
    assert empty.num_rows == 0 and "client_id" in empty.column_names
    assert read_clients(str(tmp_path / "p.parquet"), [0]).column("text").to_pylist() == ["a", "c"]


def test_label_counts_rejects_out_of_range():
    with pytest.raises(ValueError, match="labels must be in"):
        label_counts(np.array([0, 1]), np.array([0, 2]), num_clients=2, num_labels=2)
    with pytest.raises(ValueError, match="client ids must be in"):
        label_counts(np.array([0, 2]), np.array([0, 1]), num_clients=2, num_labels=2)
