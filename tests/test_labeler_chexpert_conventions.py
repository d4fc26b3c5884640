"""The labeler follows the CheXpert labeler's conventions (stanfordmlgroup/chexpert-labeler phrase lists,
negation / uncertainty rules, No Finding rule): each sentence is labelled as CheXpert labels it."""

import pytest
from xraycap.radiology_report.labeler import label_report

CM, PE, PTX, ATEL = "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Atelectasis"
OPAC, CONS, PNA, EDEMA = "Lung Opacity", "Consolidation", "Pneumonia", "Edema"
LES, FX, DEV, NF = "Lung Lesion", "Fracture", "Support Devices", "No Finding"
ECM, PO = "Enlarged Cardiomediastinum", "Pleural Other"

# (sentence, {observation: CheXpert label}); None = not mentioned (for No Finding: blank, CheXpert never writes
# No Finding = 0, stages/aggregate.py).
CHEXPERT_TABLE: list[tuple[str, dict]] = [
    # Lung Lesion: mass, nodule, nodular density/opacity, lump, cavitary lesion, carcinoma, neoplasm, tumor
    ("Calcified granuloma in the right upper lobe.", {LES: None, NF: None}),
    ("Multiple calcified granulomas.", {LES: None}),
    ("Calcified nodule in the left lung base.", {LES: None}),
    ("Scattered calcified nodules.", {LES: None, NF: None}),
    ("No nodules or masses.", {LES: 0, NF: 1}),
    ("No suspicious pulmonary nodules or masses.", {LES: 0}),
    ("Nodular opacity in the right midlung.", {LES: 1, OPAC: 1, NF: None}),
    ("Nodular density at the left base.", {LES: 1}),
    ("Nodular opacification in the lingula.", {LES: 1, OPAC: 1}),
    ("Possible mass in the right hilum.", {LES: -1, NF: None}),
    ("Right upper lobe mass.", {LES: 1}),
    ("There is a 1 cm nodule in the left upper lobe.", {LES: 1}),
    ("Massive cardiomegaly.", {LES: None, CM: 1}),
    ("Cavitary lesion in the right upper lobe.", {LES: 1}),
    ("Known bronchogenic carcinoma.", {LES: 1}),
    ("Left hilar neoplasm.", {LES: 1}),
    ("Large tumor in the left lung.", {LES: 1}),
    ("Palpable lump in the chest wall.", {LES: 1}),
    ("Bone lesion in the humerus.", {LES: None}),
    ("Old granulomatous disease.", {LES: None, NF: None}),
    ("No evidence of metastatic disease.", {LES: None}),
    # Lung Opacity: opaci-, infiltrate, airspace disease, interstitial markings, reticulation, scar
    ("Patchy opacity in the right lower lobe.", {OPAC: 1}),
    ("Bilateral infiltrates.", {OPAC: 1}),
    ("No focal airspace disease.", {OPAC: 0}),
    ("Increased interstitial markings.", {OPAC: 1}),
    ("Biapical scarring.", {OPAC: 1, PO: None}),
    ("Right apical pleural scarring.", {OPAC: None, PO: 1}),
    ("Peribronchial thickening.", {OPAC: 1}),
    ("Reticulation at the lung bases.", {OPAC: 1}),
    # Edema: edema, heart failure, CHF, vascular/pulmonary congestion (uncertain), vascular prominence (uncertain)
    ("Pulmonary edema.", {EDEMA: 1, NF: None}),
    ("No pulmonary edema.", {EDEMA: 0}),
    ("Mild pulmonary vascular congestion.", {EDEMA: -1, NF: None}),
    ("No vascular congestion.", {EDEMA: 0}),
    ("Central vascular prominence.", {EDEMA: -1}),
    ("Congestive heart failure.", {EDEMA: 1, CM: -1}),
    ("Findings consistent with CHF.", {EDEMA: 1, CM: -1}),
    ("No CHF.", {EDEMA: 0, CM: None}),
    # Cardiomegaly and Enlarged Cardiomediastinum
    ("Cardiomegaly.", {CM: 1}),
    ("Enlarged heart.", {CM: 1}),
    ("Cardiac enlargement.", {CM: 1}),
    ("Heart size is normal.", {CM: 0, NF: 1}),
    ("Heart size at the upper limits of normal.", {CM: 0}),
    ("Mediastinal widening.", {ECM: 1}),
    ("Normal mediastinal contours.", {ECM: 0}),
    # Pleural Effusion, Pneumothorax, Pleural Other
    ("Small left pleural effusion.", {PE: 1}),
    ("Small pericardial effusion.", {PE: None}),
    ("No pleural fluid.", {PE: 0}),
    ("Tiny right pneumothorax.", {PTX: 1}),
    ("No pneumothoraces.", {PTX: 0}),
    ("Right hydropneumothorax.", {PTX: 1}),
    ("Left pleural thickening.", {PO: 1}),
    ("Pulmonary fibrosis.", {PO: 1}),
    # Atelectasis, Consolidation, Pneumonia
    ("Bibasilar atelectasis.", {ATEL: 1}),
    ("Left lower lobe collapse.", {ATEL: 1}),
    ("Platelike atelectasis in the left base.", {ATEL: 1, DEV: None}),
    ("Scarring or atelectasis at the left base.", {ATEL: -1, OPAC: -1}),
    ("Atelectasis versus pneumonia.", {ATEL: -1, PNA: -1}),
    ("Right lower lobe consolidation.", {CONS: 1}),
    ("Consolidative opacity in the lingula.", {CONS: 1, OPAC: 1}),
    ("Right lower lobe pneumonia.", {PNA: 1}),
    ("Findings concerning for infection.", {PNA: -1}),
    ("No infectious process.", {PNA: 0}),
    # negation and uncertainty cues
    ("History of pneumonia.", {PNA: 0}),
    ("Possible small left pleural effusion.", {PE: -1}),
    ("Suspicious for pneumonia.", {PNA: -1}),
    ("Cannot exclude a small pneumothorax.", {PTX: -1}),
    ("Pneumothorax has resolved.", {PTX: 0}),
    ("Interval removal of the chest tube.", {DEV: 0}),
    # Fracture
    ("Healed left rib fracture.", {FX: 1}),
    ("No acute fracture.", {FX: 0}),
    ("Fractured sternotomy wire.", {FX: 1}),
    ("Pacemaker lead fracture.", {FX: None, DEV: 1}),
    # Support Devices: pacer, line(s), PICC, tube, valve, catheter, pacemaker, hardware, ...
    ("Left chest wall pacemaker.", {DEV: 1, NF: 1}),
    ("Right PICC line with tip in the SVC.", {DEV: 1}),
    ("Endotracheal tube 5 cm above the carina.", {DEV: 1}),
    ("Nasogastric tube in the stomach.", {DEV: 1}),
    ("Right internal jugular catheter.", {DEV: 1}),
    ("Orthopedic hardware in the right shoulder.", {DEV: 1}),
    ("Left shoulder arthroplasty.", {DEV: 1}),
    ("AICD in place.", {DEV: 1}),
    ("Prosthetic aortic valve.", {DEV: 1}),
    ("Aortic valve calcification.", {DEV: None}),
    ("Kerley B lines.", {DEV: None}),
    ("Old granulomatous infection, no tuberculosis.", {DEV: None, PNA: None}),
    ("Mediport in the right chest.", {DEV: 1}),
    ("No acute cardiopulmonary abnormality.", {NF: 1}),
    # --- A review against the CheXpert sources (stanfordmlgroup/chexpert-labeler; NegBio). The
    # comment above each group names the file whose rule gives the label.
    # patterns/pre_negation_uncertainty.txt "no new XXX" (matched before negation), "no evidence to rule out"
    ("No new pleural effusion.", {PE: -1, NF: None}),
    ("No new focal consolidation.", {CONS: -1}),
    ("No evidence to rule out pneumonia.", {PNA: -1}),
    ("Cannot rule out pneumonia.", {PNA: -1}),
    # patterns/negation.txt "rule out XXX", "exclude XXX" (negations; "cannot ..." is caught before them)
    ("Rule out pneumonia.", {PNA: 0}),
    ("R/O pneumonia.", {PNA: 0}),
    ("Evaluate to exclude pneumothorax.", {PTX: 0}),
    ("Pneumothorax is excluded.", {PTX: 0}),
    # patterns/negation.txt "XXX is previously demonstrated/visualized"
    ("The nodule was previously demonstrated.", {LES: 0}),
    # patterns/post_negation_uncertainty.txt "borderline heart size" (only heart size: "borderline cardiomegaly"
    # and "borderline cardiac enlargement" have no rule and stay positive)
    ("Borderline heart size.", {CM: -1, NF: None}),
    ("Borderline cardiomegaly.", {CM: 1}),
    ("Borderline cardiac enlargement.", {CM: 1}),
    # patterns/post_negation_uncertainty.txt: secondary to, worrisome for, suspicion for, favor, maybe,
    # correlate clinically for, (be|would|could|may) compatible with
    ("Left basilar opacity secondary to atelectasis.", {ATEL: -1, OPAC: 1}),
    ("Worrisome for pneumonia.", {PNA: -1}),
    ("Suspicion for pneumothorax.", {PTX: -1}),
    ("Findings favor atelectasis.", {ATEL: -1}),
    ("Maybe early pneumonia.", {PNA: -1}),
    ("Correlate clinically for pneumonia.", {PNA: -1}),
    ("The opacity is compatible with atelectasis.", {ATEL: -1, OPAC: 1}),
    # patterns/post_negation_uncertainty.txt: XXX may be present, XXX is not appreciated, XXX is not (well)
    # visualized / evaluated, XXX is not clearly seen, XXX is poorly evaluated, XXX is obscured
    ("A small left pleural effusion may be present.", {PE: -1}),
    ("Left pleural effusion is not appreciated.", {PE: -1}),
    ("No pleural effusion is appreciated.", {PE: 0}),
    ("Pneumothorax is not well visualized.", {PTX: -1}),
    ("Pneumothorax is not clearly seen.", {PTX: -1}),
    ("Effusion is poorly evaluated on the lateral view.", {PE: -1}),
    ("Pneumothorax is not seen.", {PTX: 0}),
    # phrases/mention/no_finding.txt: a positive or uncertain mention of one of its phrases (degenerative,
    # calcified, granuloma, scoliosis, emphysema, blunting, defibrillator, ...) also leaves No Finding blank
    # (stages/aggregate.py); a negated one does not (an earlier documented departure ignored the list)
    ("Degenerative changes of the thoracic spine.", {NF: None}),
    ("Mild scoliosis.", {NF: None}),
    ("Possible emphysema.", {NF: None}),
    ("No emphysema.", {NF: 1}),
    ("Blunting of the right costophrenic angle.", {NF: None, PE: None}),
    ("Dual-chamber defibrillator in place.", {DEV: 1, NF: None}),
    ("Hyperinflated lungs.", {NF: None}),
    ("No hiatal hernia.", {NF: 1}),
    # The phantom findings (atelectasis, edema, support devices, rib fracture, widened mediastinum), each a
    # phrase on CheXpert's mention lists (phrases/mention/*.txt, mention_phrases/support_devices.txt)
    ("Plate-like atelectasis at the left base with volume loss.", {ATEL: 1, NF: None}),
    ("Bilateral perihilar opacities consistent with pulmonary edema.", {EDEMA: 1, OPAC: 1}),
    ("Mild interstitial edema.", {EDEMA: 1}),
    ("Right internal jugular central venous catheter with tip in the SVC.", {DEV: 1, NF: 1}),
    ("Endotracheal tube terminates 4 cm above the carina.", {DEV: 1}),
    ("Left chest wall pacemaker with leads in the right atrium and right ventricle.", {DEV: 1, NF: 1}),
    ("Acute fracture of the left 7th rib.", {FX: 1, NF: None}),
    ("Displaced right posterior rib fracture.", {FX: 1}),
    ("The mediastinum is widened.", {ECM: 1, NF: None}),
    ("Widening of the superior mediastinum.", {ECM: 1}),
    ("The mediastinum is not widened.", {ECM: 0, NF: 1}),
    ("No edema, atelectasis or rib fracture.", {EDEMA: 0, ATEL: 0, FX: 0, NF: 1}),
    # patterns/post_negation_uncertainty.txt has no rule for "likely" (only "less likely"), "probably",
    # "presumed", "suggestive of" / "suggests", "equivocal", "indeterminate", "questionably" or "evaluate for":
    # CheXpert calls these mentions positive (an earlier documented departure made them uncertain).
    ("Left base opacity, likely atelectasis.", {ATEL: 1, OPAC: 1}),
    ("Atelectasis is likely.", {ATEL: 1}),
    ("Probably atelectasis at the left base.", {ATEL: 1}),
    ("Presumed right lower lobe pneumonia.", {PNA: 1}),
    ("Findings suggestive of pulmonary edema.", {EDEMA: 1}),
    ("The appearance suggests pneumonia.", {PNA: 1}),
    ("Equivocal small left pleural effusion.", {PE: 1}),
    ("Indeterminate nodule in the right upper lobe.", {LES: 1}),
    ("Questionably increased opacity at the right base.", {OPAC: 1}),
    ("Evaluate for pneumonia.", {PNA: 1}),
    # ... but it has "suggestion of XXX", "question of XXX", "XXX in question", "less likely" and
    # "differential diagnosis includes XXX"
    ("Suggestion of a small right pleural effusion.", {PE: -1}),
    ("Question of a small left pneumothorax.", {PTX: -1}),
    ("Pneumonia is less likely.", {PNA: -1}),
    ("Differential diagnosis includes pneumonia.", {PNA: -1}),
    # patterns/post_negation_uncertainty.txt has no "suggestive" rule and NegBio's own rule
    # (negbio/neg/neg_detector.py, match_uncertainty) exempts "most suggestive of": not uncertain
    ("Streaky opacity most suggestive of atelectasis.", {ATEL: 1, OPAC: 1}),
    # loader/load.py clean(): "and/or" -> "or", "A/B" -> "A or B"; then the "A or B" rule
    ("Left basilar atelectasis/scarring.", {ATEL: -1, OPAC: -1}),
    ("Pneumonia and/or small effusion.", {PNA: -1, PE: -1}),
    ("Right chest wall mass w/o effusion.", {LES: 1, PE: 0}),
    # phrases/unmention/lung_lesion.txt "calcified nodul" also covers "calcified nodular density"
    ("Calcified nodular density in the right upper lobe.", {LES: None}),
    # phrases/mention/lung_lesion.txt matches substrings: "mass" in "masslike", "nodule" in "micronodules"
    ("Masslike opacity in the right hilum.", {LES: 1, OPAC: 1}),
    ("Scattered micronodules.", {LES: 1}),
    # phrases/unmention/lung_opacity.txt is only "pleural scar": "pleuroparenchymal scar" is both
    ("Pleuroparenchymal scarring at the apices.", {OPAC: 1, PO: 1}),
    ("Pleural scarring at the apices.", {OPAC: None}),
    # phrases/mention/edema.txt matches the substring "edema" ("edematous")
    ("Edematous interstitial changes.", {EDEMA: 1}),
]


@pytest.mark.parametrize(
    "text,expected", CHEXPERT_TABLE, ids=[f"{i:02d}-{t[:30]}" for i, (t, _) in enumerate(CHEXPERT_TABLE)]
)
def test_chexpert_conventions(text, expected):
    """Each sentence gets the label the CheXpert labeler's phrase lists and rules give it."""
    labels = label_report(text)
    wrong = {o: (labels[o], v) for o, v in expected.items() if labels[o] != v}
    assert not wrong, f"{text!r}: (got, expected) {wrong}"


def test_table_size():
    assert len(CHEXPERT_TABLE) >= 60
