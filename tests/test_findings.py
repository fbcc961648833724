"""MeSH terms -> what SynthCXR draws and the label columns."""

from collections import Counter

import numpy as np

from g2d.data.synthcxr import findings as fnd


def rng():
    return np.random.default_rng(0)


def test_side_zone_severity_from_attributes():
    [f] = fnd.parse_term("Opacity/lung/base/left", rng())
    assert (f.kind, f.side, f.zone, f.severity, f.term) == ("opacity", "left", "lower", 0.5, "Opacity/lung/base/left")
    [f] = fnd.parse_term("Pleural Effusion/bilateral/small", rng())
    assert (f.kind, f.side, f.zone, f.severity) == ("effusion", "bilateral", "lower", 0.33)
    [f] = fnd.parse_term("Calcified Granuloma/lung/upper lobe/right", rng())
    assert (f.kind, f.side, f.zone) == ("granuloma", "right", "upper")
    [f] = fnd.parse_term("Cardiomegaly/severe", rng())
    assert (f.kind, f.side, f.severity) == ("cardiomegaly", "bilateral", 1.0)
    [f] = fnd.parse_term("Opacity/lung/lingula", rng())
    assert (f.side, f.zone) == ("left", "middle")


def test_conditional_heads_and_undrawable_terms():
    assert fnd.parse_term("Lung/hyperdistention/mild", rng())[0].kind == "emphysema"
    assert fnd.parse_term("Costophrenic Angle/right/blunted", rng())[0].kind == "effusion"
    assert fnd.parse_term("Lung/hypoinflation", rng()) == []
    assert fnd.parse_term("Spine/degenerative", rng()) == []
    assert fnd.parse_term("Surgical Instruments/abdomen/right", rng()) == []  # below the rendered chest


def test_midline_devices_and_more_zone_words():
    [f] = fnd.parse_term("Tube, Inserted/trachea, carina", rng())
    assert (f.kind, f.side) == ("device", "bilateral")  # the renderer's midline tubes
    [f] = fnd.parse_term("Density/cardiophrenic angle/left", rng())
    assert (f.kind, f.side, f.zone) == ("opacity", "left", "lower")


def test_multiple_nodules_become_several_findings():
    got = fnd.parse_term("Calcified Granuloma/lung/bilateral/multiple", rng())
    assert 2 <= len(got) <= 3 and {f.kind for f in got} == {"granuloma"}
    assert {f.side for f in got} == {"right", "left"}


def test_findings_for_counts_what_is_not_drawn_and_dedups_global_kinds():
    found, not_drawn = fnd.findings_for(
        ("normal", "Cardiomegaly/mild", "Cardiac Shadow/enlarged", "Spine/degenerative", "Aorta/tortuous"), rng())
    assert [f.kind for f in found] == ["cardiomegaly"]
    assert not_drawn == Counter({"Spine": 1, "Aorta": 1, "cardiomegaly (already drawn for another term)": 1})


def test_labels_describe_the_drawn_kinds():
    labels = fnd.labels_for(["consolidation", "granuloma"])
    assert labels["opacity"] == labels["consolidation"] == labels["nodule"] == 1
    assert labels["normal"] == 0 and labels["effusion"] == 0
    assert fnd.labels_for([]) == {"normal": 1, **{c: 0 for c in fnd.LABELS}}
    assert tuple(labels) == fnd.LABEL_COLUMNS
    assert fnd.labels_for(["scar"])["normal"] == 0
