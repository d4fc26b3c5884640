"""The rule-based CheXpert-style labeler: a hand-written sentence table, real Indiana phrasing, agreement
with the human-coded MeSH column, and the synthetic phantom reports."""

import csv

import pytest
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS, label_report, label_reports, split_clauses
from xraycap.radiology_report.mesh_agreement import (
    MACRO_OBSERVATIONS,
    MESH_TO_CHEXPERT,
    agreement_table,
    format_table,
    macro_f1,
    mesh_to_observations,
)

CM, PE, PTX, ATEL = "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Atelectasis"
OPAC, CONS, PNA, EDEMA = "Lung Opacity", "Consolidation", "Pneumonia", "Edema"
LES, FX, DEV, NF = "Lung Lesion", "Fracture", "Support Devices", "No Finding"
ECM, PO = "Enlarged Cardiomediastinum", "Pleural Other"

# (sentence or short report, {observation: expected label}); observations not listed are not checked,
# except where None is listed (must be unmentioned).
SENTENCES: list[tuple[str, dict]] = [
    # --- plain positives
    ("Cardiomegaly.", {CM: 1, NF: None}),
    ("The heart is enlarged.", {CM: 1}),
    ("Heart size is mildly enlarged.", {CM: 1}),
    ("The cardiac silhouette is moderately enlarged.", {CM: 1}),
    ("Enlarged cardiac silhouette.", {CM: 1}),
    ("Stable moderate cardiomegaly.", {CM: 1}),
    ("Borderline cardiomegaly.", {CM: 1}),
    ("There is a small left pleural effusion.", {PE: 1, NF: None}),
    ("Bilateral pleural effusions with blunting of the costophrenic angles.", {PE: 1}),
    ("Right pneumothorax with a visible pleural line.", {PTX: 1, DEV: None}),
    ("A left apical pneumothorax is present.", {PTX: 1}),
    ("Bibasilar atelectasis.", {ATEL: 1}),
    ("Right lower lobe consolidation.", {CONS: 1}),
    ("Airspace opacity in the left lower lobe consistent with consolidation.", {OPAC: 1, CONS: 1}),
    ("There is a 1.5 cm nodule in the right upper lung zone.", {LES: 1}),
    ("Calcified granuloma in the left upper lobe.", {LES: None, NF: None}),  # no_finding.txt
    ("Right upper lobe mass.", {LES: 1}),
    ("Pulmonary vascular congestion with interstitial edema.", {EDEMA: 1}),
    ("Right lower lobe pneumonia.", {PNA: 1}),
    ("Healed left rib fractures.", {FX: 1}),
    ("Left chest wall pacemaker with leads in the right atrium and ventricle.", {DEV: 1, NF: 1}),
    ("Right IJ central venous catheter with tip in the SVC.", {DEV: 1}),
    ("Endotracheal tube 4 cm above the carina.", {DEV: 1}),
    ("Widened mediastinum.", {ECM: 1}),
    ("Right apical pleural thickening.", {PO: 1}),
    ("Widening may be secondary to prominent mediastinal fat.", {ECM: None}),
    # --- negation
    ("No pneumothorax.", {PTX: 0, NF: 1}),
    ("There is no pneumothorax or pleural effusion.", {PTX: 0, PE: 0}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", {CONS: 0, PE: 0, PTX: 0}),
    ("Lungs are clear without effusion.", {PE: 0}),
    ("Negative for pneumothorax.", {PTX: 0}),
    (
        "Negative for focal pulmonary consolidation, pleural effusion, or pneumothorax.",
        {CONS: 0, PE: 0, PTX: 0},
    ),
    ("The lungs are free of focal airspace disease.", {OPAC: 0}),
    ("Costophrenic angles are clear of effusion.", {PE: 0}),
    ("There is no evidence of pneumothorax.", {PTX: 0}),
    ("There are no XXXX of a pleural effusion.", {PE: 0}),
    ("Pneumothorax is not seen.", {PTX: 0}),
    ("The previously seen effusion has resolved.", {PE: 0}),
    ("Interval resolution of the right lower lobe pneumonia.", {PNA: 0}),
    ("The heart is not enlarged.", {CM: 0, NF: 1}),
    ("Heart size is normal.", {CM: 0}),
    ("Normal cardiac silhouette.", {CM: 0}),
    ("Heart size and mediastinal contours are within normal limits.", {CM: 0, ECM: 0}),
    ("The cardiomediastinal silhouette is within normal limits.", {CM: 0, ECM: 0}),
    ("Heart size upper limits of normal.", {CM: 0}),
    (
        "cardiac size mediastinal contour and pulmonary vascularity are within normal limits .",
        {CM: 0, ECM: 0},
    ),
    ("No acute bony abnormality. No displaced rib fracture.", {FX: 0}),
    ("No findings to suggest pulmonary edema.", {EDEMA: 0}),
    ("There are no airspace opacities to suggest pneumonia.", {PNA: 0, OPAC: 0}),
    ("No suspicious pulmonary nodules or masses.", {LES: 0}),
    ("Interval removal of the right chest tube.", {DEV: 0}),
    ("Evidence of previous granulomatous infection.", {PNA: None, LES: None}),
    ("No acute cardiopulmonary abnormality.", {NF: 1, CM: None, PE: None}),
    # --- uncertainty
    ("Possible left lower lobe pneumonia.", {PNA: -1, NF: None}),
    ("Small left pleural effusion cannot be excluded.", {PE: -1}),
    ("Cannot exclude a small right pneumothorax.", {PTX: -1}),
    ("Left basilar opacity may represent atelectasis.", {ATEL: -1, OPAC: 1}),
    ("Questionable right apical pneumothorax.", {PTX: -1}),
    ("Probable small bilateral pleural effusions.", {PE: -1}),
    ("Atelectasis versus pneumonia in the left base.", {ATEL: -1, PNA: -1}),
    ("Retrocardiac opacity, atelectasis versus consolidation.", {OPAC: 1, ATEL: -1, CONS: -1}),
    ("Pneumothorax?", {PTX: -1}),
    ("Small bilateral pleural effusions suspected.", {PE: -1}),
    ("Pneumonia is not excluded.", {PNA: -1}),
    ("Concerning for right upper lobe mass.", {LES: -1}),
    # --- scope: negation stops at the clause boundary, sentences are separate
    ("No effusion but mild cardiomegaly.", {PE: 0, CM: 1}),
    ("No pneumothorax; small left pleural effusion.", {PTX: 0, PE: 1}),
    ("There is no pneumothorax, however there is a small right effusion.", {PTX: 0, PE: 1}),
    ("No pleural effusion. Moderate cardiomegaly.", {PE: 0, CM: 1}),
    ("Possible small effusion, no pneumothorax.", {PE: -1, PTX: 0}),
    ("Stable cardiomegaly without pulmonary edema.", {CM: 1, EDEMA: 0}),
    ("Mild cardiomegaly without acute cardiopulmonary abnormality.", {CM: 1}),
    ("The heart is enlarged and there is no pleural effusion.", {CM: 1, PE: 0}),
    ("No change in the small left pleural effusion.", {PE: 1}),
    ("No interval change in mild cardiomegaly.", {CM: 1}),
    ("Right greater than left pleural effusions.", {PE: 1}),
    (
        "Heart size is normal. The lungs are clear. No pneumothorax or pleural effusion.",
        {NF: 1, CM: 0, PE: 0},
    ),
    # --- follow-up phrasing: change words do not negate
    # CheXpert's pre-negation uncertainty rule "no new XXX" (patterns/pre_negation_uncertainty.txt).
    ("No new consolidation.", {CONS: -1}),
    ("The previously noted right pneumothorax has resolved.", {PTX: 0}),
    ("Pleural effusions have decreased.", {PE: 1}),
    ("Cardiomegaly is unchanged.", {CM: 1}),
    ("No radiographic evidence of pneumonia.", {PNA: 0}),
    ("Findings consistent with congestive heart failure.", {EDEMA: 1}),
    ("Left-sided Port-A-Cath terminates in the SVC.", {DEV: 1}),
    ("Lungs are hyperinflated but clear.", {NF: None}),  # CheXpert's no_finding.txt "hyperinflat"
    # --- No Finding rule: CheXpert (stages/aggregate.py) writes No Finding only as 1, blank where there is a
    # finding (these entries said 0 until the labeler was checked against CheXpert's published output)
    ("Pacemaker in place. No acute disease.", {DEV: 1, NF: 1}),
    ("Possible right pneumothorax.", {NF: None}),
    ("", dict.fromkeys(CHEXPERT_OBSERVATIONS)),
    ("   \n ", {NF: None}),
]


@pytest.mark.parametrize("text,expected", SENTENCES, ids=[f"{i:02d}" for i in range(len(SENTENCES))])
def test_sentence_table(text, expected):
    """Hand-written sentences: negation, uncertainty and their scope are labelled as a reader would."""
    labels = label_report(text)
    wrong = {o: (labels[o], v) for o, v in expected.items() if labels[o] != v}
    assert not wrong, f"{text!r}: (got, expected) {wrong}"


def test_sentence_table_size_and_coverage():
    assert len(SENTENCES) >= 60
    values = {v for _, e in SENTENCES for v in e.values()}
    assert {1, 0, -1, None} <= values


def test_label_reports_api():
    labels = label_reports(["Cardiomegaly.", "", "Possible effusion."])
    assert len(labels) == 3
    for lab in labels:
        assert list(lab) == list(CHEXPERT_OBSERVATIONS) and len(lab) == 14
        assert set(lab.values()) <= {1, 0, -1, None}
    assert labels[1] == dict.fromkeys(CHEXPERT_OBSERVATIONS)
    with pytest.raises(ValueError, match="list of reports"):
        label_reports("Cardiomegaly.")
    with pytest.raises(ValueError, match="string report"):
        label_report(3)
    assert split_clauses("no effusion but mild cardiomegaly") == ["no effusion", "mild cardiomegaly"]


# Real Indiana phrasing (../shared/data/iu_xray_reports_sample): expected labels written by reading each
# report (findings + impression); the text itself stays in the shared folder.
IU_EXPECTED: dict[str, dict] = {
    "1": {NF: 1, CM: 0, ECM: 0, EDEMA: 0, CONS: 0, PE: 0, PTX: 0},  # "no XXXX of a pleural effusion"
    # CheXpert's no_finding.txt: "degenerative change(s)" of the spine leave No Finding blank (6, 1048, 2178, 2581)
    "6": {NF: None, CM: 0, OPAC: 0, CONS: 0, PE: 0, PTX: 0},  # "no ... or suspicious pulmonary opacity"
    "141": {NF: 1, OPAC: 0, PE: 0, PTX: 0},  # negated list with "suspicious" inside
    "1048": {NF: None, PE: 0, PTX: 0},
    "2178": {NF: None, LES: 0},  # "... rather than metastasis" (XXXX than)
    "2581": {NF: None, PNA: 0, OPAC: 0},  # "no focal air space opacity to suggest a pneumonia"
    "1112": {ECM: 1, CM: 1, EDEMA: -1, LES: -1, PE: 0, PTX: 0},  # "mass is not excluded", congestion
    # "there may also be", "question of"; "borderline heart size" is CheXpert-uncertain, "upper limits of
    # normal heart size" negative
    "1076": {CM: -1, EDEMA: -1, PE: -1, PNA: -1, FX: 1},
    "2814": {CM: 1, EDEMA: -1, PE: -1},  # "effusions suspected"
    "3001": {PE: -1, NF: None},  # "cannot exclude small pleural effusions"
    "3848": {CM: 1, PTX: 0, DEV: 0, PE: 0},  # "removal of the PICC line", "without significant effusion"
    "3865": {CM: 0, FX: -1},  # "top normal in size", "possibly old fractures"
    "175": {CM: 1, ATEL: 1, PE: -1, PTX: 0},  # "scarring versus XXXX effusion"
    "2112": {DEV: 1, FX: None},  # "catheter fracture" is not a bone fracture
    "1957": {PE: 1, EDEMA: -1, PNA: -1, ATEL: -1},  # differential diagnosis list
    "3502": {CM: 1, DEV: 1, PE: 0, PTX: 0, CONS: 0},
    "3829": {CM: 1, ATEL: -1, PE: 0},  # "atelectasis or ...": CheXpert's "or" rule
    "163": {PNA: 0, LES: 1},  # "no airspace opacities to suggest pneumonia"
}


def test_real_indiana_phrasing(shared_data):
    """Selected real Indiana reports are labelled as a reader would."""
    with open(
        shared_data / "iu_xray_reports_sample" / "indiana_reports.csv", newline="", encoding="utf-8"
    ) as f:
        rows = {r["uid"]: r for r in csv.DictReader(f)}
    wrong = []
    for uid, expected in IU_EXPECTED.items():
        text = "\n".join(x for x in (rows[uid]["findings"], rows[uid]["impression"]) if x)
        labels = label_report(text)
        wrong += [(uid, o, labels[o], v) for o, v in expected.items() if labels[o] != v]
    assert not wrong, f"(uid, observation, got, expected): {wrong}"


def test_r2gen_cleaned_text_labels_like_the_raw_text(shared_data):
    """References cleaned the R2Gen way (lower-case, no punctuation, " . " between sentences) label the same."""
    from xraycap.radiology_report.language_metrics import normalize_report
    from xraycap.radiology_report.mesh_agreement import read_reports, report_text

    texts = [
        report_text(r) for r in read_reports(shared_data / "iu_xray_reports_sample" / "indiana_reports.csv")
    ]
    texts = [t for t in texts if t]
    raw, cleaned = label_reports(texts), label_reports([normalize_report(t) for t in texts])
    pairs = [(a[o], b[o]) for a, b in zip(raw, cleaned) for o in CHEXPERT_OBSERVATIONS]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"\nraw vs R2Gen-cleaned labels: {agreement:.4f} of {len(pairs)} (report, observation) pairs agree")
    assert agreement >= 0.995


def test_mesh_mapping_is_the_fixed_issue_mapping():
    """MeSH headings (before the first "/") map to the 8 observations; unmapped headings count for nothing."""
    assert mesh_to_observations("normal") == set()
    assert mesh_to_observations("Cardiomegaly/mild;Pleural Effusion/right") == {CM, PE}
    assert mesh_to_observations("Thoracic Vertebrae/degenerative;Catheters, Indwelling") == {DEV}
    assert mesh_to_observations("Pulmonary Congestion;Nodule/right") == {EDEMA, LES}
    assert mesh_to_observations("Calcified Granuloma/lung;Granulomatous Disease;Stents") == set()
    assert len(MACRO_OBSERVATIONS) == 8


def test_agreement_with_indiana_mesh(shared_data, capsys):
    """Agreement with the human-coded MeSH column of the 409-report sample (uncertain = not positive),
    per observation and macro over the 8 observations; the command-line entry point prints the table."""
    from xraycap.radiology_report.mesh_agreement import main

    csv_path = shared_data / "iu_xray_reports_sample" / "indiana_reports.csv"
    table = agreement_table(csv_path)
    rows = {r.observation: r for r in table}
    assert rows[CM].n == 408 and rows[CM].mesh_positive == 36
    # The agreement is reported (README, results/mesh_agreement.json), not a target: where Indiana's coding
    # and CheXpert's rules differ, CheXpert's win. This floor only catches a broken labeler (it was 0.85
    # while the withdrawn 0.90 target stood; CheXpert's hedge rules took the figure to 0.850).
    assert macro_f1(table) >= 0.80
    for observation in (CM, PE, PTX, DEV):
        assert rows[observation].f1 >= 0.95, rows[observation]
    main([str(csv_path)])
    assert "macro F1 (8 observations)" in capsys.readouterr().out
    print("\n" + format_table(table))


def test_held_out_reports_are_a_fixed_third(shared_data):
    """The held-out reports (never read to write a rule) are a fixed set: the same 136 of the 409 every run,
    and their agreement is reported beside the whole sample's."""
    from xraycap.radiology_report.mesh_agreement import agreement_subsets, is_held_out, read_reports

    rows = read_reports(shared_data / "iu_xray_reports_sample" / "indiana_reports.csv")
    held_out = sorted((r["uid"] for r in rows if is_held_out(r["uid"])), key=int)
    assert len(rows) == 409 and len(held_out) == 136
    assert held_out[:5] == ["1", "17", "42", "58", "62"]
    tables = agreement_subsets(shared_data / "iu_xray_reports_sample" / "indiana_reports.csv")
    assert [t[0].n for t in tables.values()] == [408, 136, 272]
    for name, table in tables.items():
        print(f"\n{name}: macro F1 {macro_f1(table):.3f}")


def test_phantom_reports_match_their_mesh(tmp_path):
    """The data engineer's synthetic phantom phrasing is read right (checked against its MeSH column). A support
    device is a finding of its own (Support Devices) but, as in CheXpert's rules, not one that rules out No
    Finding: a study whose only drawn findings are devices reads No Finding."""
    synthesize = pytest.importorskip("xraycap.dataset_builder").synthesize
    out = synthesize(tmp_path / "phantom", num_studies=120, seed=3, image_size=64)
    with open(out / "indiana_reports.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120
    mesh_heading = {"Cardiomegaly": CM, "Pleural Effusion": PE, "Pneumothorax": PTX, "Nodule": LES}
    wrong, seen = [], set()
    for row in rows:
        headings = {t.split("/")[0] for t in row["MeSH"].split(";")} - {"normal"}
        seen |= headings
        devices = headings & set(MESH_TO_CHEXPERT[DEV])
        for section in ("findings", "impression"):
            labels = label_report(row[section])
            for heading, observation in mesh_heading.items():
                if (labels[observation] == 1) != (heading in headings):
                    wrong.append((row["uid"], section, observation, labels[observation], row[section]))
            if "Consolidation" in headings and not (labels[CONS] == 1 or labels[OPAC] == 1):
                wrong.append((row["uid"], section, CONS, labels[CONS], row[section]))
            # CheXpert's no_finding.txt: "degenerative changes" of the spine are a finding too.
            if (labels[DEV] == 1) != bool(devices):
                wrong.append((row["uid"], section, DEV, labels[DEV], row[section]))
            if (labels[NF] == 1) != (not headings - devices and "degenera" not in row[section].lower()):
                wrong.append((row["uid"], section, NF, labels[NF], row[section]))
    assert {"Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Nodule", "Consolidation"} <= seen
    assert seen & set(MESH_TO_CHEXPERT[DEV])
    assert not wrong, wrong[:5]


def test_long_repetitive_text_is_fast():
    """Generated reports can loop: labelling stays linear in the text length."""
    import time

    texts = [
        "possible " * 2000 + "effusion " * 2000,
        "small left pleural effusion . " * 1000,
        "heart " + "is " * 3000,
    ]
    start = time.process_time()
    labels = label_reports(texts)
    assert time.process_time() - start < 5
    assert labels[0][PE] == -1 and labels[1][PE] == 1 and labels[2][NF] == 1


def test_module_docstring_example():
    import doctest

    from xraycap.radiology_report import labeler

    results = doctest.testmod(labeler)
    assert results.failed == 0 and results.attempted >= 2
