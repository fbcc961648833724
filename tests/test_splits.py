"""Patient-level splits and nested, seeded label fractions."""

import hashlib

from g2d.data import splits


def test_every_patient_gets_one_split_with_shares_close_to_asked():
    # (that a patient's images never straddle splits is checked on real manifests in test_synth)
    patients = [f"p{i // 3}" for i in range(300)]  # 3 images per patient
    strata = ["pos" if int(p[1:]) % 4 == 0 else "neg" for p in patients]
    mapping = splits.assign_splits(patients, strata, val=0.1, test=0.2, seed=7)
    assert set(mapping) == set(patients)
    counts = {s: sum(1 for v in mapping.values() if v == s) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    # stratified: positives are spread over the splits
    pos = {p: s for p, s in mapping.items() if int(p[1:]) % 4 == 0}
    assert {s: sum(1 for v in pos.values() if v == s) for s in ("train", "val", "test")} == \
        {"train": 18, "val": 2, "test": 5}


def test_splits_are_seeded():
    patients = [f"p{i}" for i in range(50)]
    a = splits.assign_splits(patients, ["x"] * 50, 0.1, 0.2, seed=1)
    assert a == splits.assign_splits(list(reversed(patients)), ["x"] * 50, 0.1, 0.2, seed=1)
    assert a != splits.assign_splits(patients, ["x"] * 50, 0.1, 0.2, seed=2)


def test_fractions_are_nested_stratified_and_seeded():
    ids = [f"r{i:03d}" for i in range(400)]
    strata = ["1" if i % 10 == 0 else "0" for i in range(400)]
    chosen = splits.nested_fractions(ids, strata, (0.01, 0.1, 1.0), seed=3)
    assert set(chosen[0.01]) < set(chosen[0.1]) < set(chosen[1.0]) == set(ids)
    assert len(chosen[0.01]) == 1 + 4  # ceil(1% of 40 positives) + ceil(1% of 360 negatives)
    assert any(int(i[1:]) % 10 == 0 for i in chosen[0.01])  # a positive even at 1%
    assert chosen == splits.nested_fractions(ids, strata, (0.01, 0.1, 1.0), seed=3)
    assert chosen[0.1] != splits.nested_fractions(ids, strata, (0.01, 0.1, 1.0), seed=4)[0.1]


def test_fraction_files_are_written_and_hashed(tmp_path):
    info = splits.write_fractions(tmp_path, {0.01: ["a"], 1.0: ["a", "b"]})
    assert info["0.01"]["file"] == "fractions/train_0.01.txt"
    data = (tmp_path / "fractions" / "train_1.txt").read_bytes()
    assert data == b"a\nb\n"
    assert info["1"] == {"file": "fractions/train_1.txt", "rows": 2, "sha256": hashlib.sha256(data).hexdigest()}
