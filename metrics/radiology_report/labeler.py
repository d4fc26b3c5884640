"""A rule-based labeler for chest X-ray reports following the CheXpert labeler's conventions (no model, no download).

It reads a free-text report and assigns each of the 14 CheXpert observations one of
`1` (positive), `0` (negative), `-1` (uncertain) or `None` (not mentioned), following the three stages of
the CheXpert labeler (Irvin et al., 2019):

1. **Mention extraction.** Each observation has a list of mention phrases (regular expressions, e.g.
   "effusion" (not "pericardial effusion"), "pleural fluid" for Pleural Effusion; "the heart is enlarged",
   "cardiomegaly" for Cardiomegaly). Organ statements such as "heart size is normal" or "normal cardiac
   silhouette" are negative mentions of the matching observation.
2. **Classification of each mention** inside its *sentence* and its *clause* (a sentence is cut into
   clauses at "but", "however", "although", "which", ";", ", with", "and there"... so that in
   "no effusion but mild cardiomegaly" the negation does not reach "cardiomegaly"). The nearest cue
   before the mention in its clause decides: a negation cue ("no", "without", "negative for", "free
   of", "clear of", "absence of", "resolution of", "rule out"...) gives 0, an uncertainty cue ("possible",
   "may represent", "cannot exclude", "no new", "secondary to", "versus", "suggestion of"...) gives -1;
   hedges CheXpert has no rule for ("likely", "suggestive of") change nothing, as in CheXpert. Cues after the mention ("... is not seen", "... has resolved", "... cannot
   be excluded", "... is suspected", "... is not appreciated") are read next. Pseudo-negations ("no
   change in", "no interval increase") are ignored. CheXpert's cleaning ("A/B" is "A or B"), its "A or B"
   rule and its always-uncertain phrases (vascular congestion, vascular prominence, "borderline heart
   size") apply. The README lists each rule with its CheXpert source file, and every departure.
3. **Aggregation** over the mentions of a report: positive wins over uncertain, which wins over
   negative. "No Finding" is 1 when the report is not empty, none of the 12 pathology observations
   (all but "No Finding" and "Support Devices") is positive or uncertain and no "other finding" of
   CheXpert's No Finding list (degenerative, calcified, granuloma, scoliosis, emphysema, blunting, ...) is
   mentioned positive or uncertain; otherwise None (blank): CheXpert never writes No Finding = 0. An empty report gets no label at all (every value is None).

Example:

```python
>>> from xraycap.radiology_report.labeler import label_reports
>>> labels = label_reports(["No effusion but mild cardiomegaly. Possible left basilar atelectasis."])
>>> labels[0]["Cardiomegaly"], labels[0]["Pleural Effusion"], labels[0]["Atelectasis"]
(1, 0, -1)

```
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""The 14 CheXpert observations, in the CheXpert column order."""

PATHOLOGY_OBSERVATIONS: tuple[str, ...] = tuple(
    o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices")
)
"""The 12 observations whose positive or uncertain mention rules out "No Finding"."""

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# --------------------------------------------------------------------------------------------------
# Mention phrases. Patterns are matched on lower-cased text with single spaces.
# A mention is (observation, pattern, fixed_label): fixed_label None means "decided by the cues";
# 0 means the phrase itself states normality ("heart size is normal").
# --------------------------------------------------------------------------------------------------

_HEART = r"(?:heart|cardiac)(?: (?:size|silhouette|contours?|shadow|diameter|borders?))?"
_MEDIASTINUM = (
    r"(?:(?:cardio)?mediastin(?:al|um)(?: (?:size|silhouettes?|contours?|shadow|width|structures))?"
    r"|(?:cardio)?mediastinal)"
)
_COPULA = (
    r"(?: (?:is|are|was|were|appears?|remains?|seems?|again|still|now|stably|be|to|been|has|have|"
    r"mildly|moderately|markedly|severely|slightly|somewhat|minimally|significantly|grossly|overall|"
    r"not|likely|probably|possibly|may|of|at|in|the|size|borderline|top|upper|within|otherwise|"
    r"stable|unchanged|xxxx|(?:moderate|mild|moderately|mildly) to (?:moderate|marked|severe|severely|markedly)))*"
)
# "Heart size and mediastinal contours are ...": a second subject joined by "and" / ",".
# Without punctuation (R2Gen-cleaned text) the joiner may be a bare space before "<word> contour(s)" etc.
_SUBJECT_NOUN = r"(?:contours?|silhouettes?|size|width|vascularity|vasculature)"
_AND_SUBJECT = (
    rf"(?:(?: ?,| and| ?, and)(?: the)? [a-z]+(?: {_SUBJECT_NOUN})?|(?: the)? [a-z]+ {_SUBJECT_NOUN}){{0,3}}"
)
_ENLARGED = r"(?:enlarged|enlargement|large|increased|prominent|prominence|widened|widening)"
# "Upper limits of normal" / "top normal" is read as normal (Indiana's coders do not code it as cardiomegaly).
_NORMAL = (
    r"(?:normal(?:ly)?|within normal limits|within (?:the )?limits of normal|unremarkable|not enlarged|negative|preserved|"
    r"(?:at |near )?(?:the )?(?:top|upper|high)(?:[ -](?:limits?|range|end|normal))?(?: (?:of|limits?))* normal)"
)

_SEV = r"(?:(?:mild|mildly|moderate|moderately|severe|severely|marked|markedly|minimal|slight|borderline|stable|massive|significant|gross) )"

_MENTIONS: dict[str, list[tuple[str, int | None]]] = {
    "Enlarged Cardiomediastinum": [
        (
            rf"\b{_MEDIASTINUM}{_AND_SUBJECT}{_COPULA} (?:enlarged|widened|widening|prominent|enlargement)\b",
            None,
        ),
        (
            rf"\b(?:enlarged|widened|widening of(?: the)?|enlargement of(?: the)?|prominent|prominence of(?: the)?)"
            rf"(?: (?:superior|upper|anterior|central))? {_MEDIASTINUM}\b(?! (?:fat|lipomatosis|lymph|nodes?|adenopathy|lymphadenopathy|mass))",
            None,
        ),
        (r"\bmediastinal (?:widening|enlargement|prominence)\b", None),
        (rf"\b{_MEDIASTINUM}{_AND_SUBJECT}{_COPULA} {_NORMAL}\b", NEGATIVE),
        (rf"\b(?:normal|unremarkable)(?:[ -]sized)?(?: [a-z]+)?{_AND_SUBJECT} {_MEDIASTINUM}\b", NEGATIVE),
        (rf"\b{_MEDIASTINUM}(?: is| are)? of normal (?:size|contour|width)", NEGATIVE),
    ],
    "Cardiomegaly": [
        (r"\bcardiomegaly\b", None),
        (rf"\b{_HEART}{_AND_SUBJECT}{_COPULA} {_SEV}?{_ENLARGED}\b", None),
        (
            rf"\b{_SEV}?(?:enlarged|enlargement of the|enlargement of|large|increased size of the) {_HEART}\b",
            None,
        ),
        (r"\bcardiac (?:enlargement|prominence)\b", None),
        (r"\bborderline (?:heart|cardiac)(?: size)?\b", None),
        (r"\b(?:heart size|cardiac size|cardiac silhouette) (?:is )?(?:at )?(?:the )?borderline\b", None),
        (rf"\b{_HEART}{_AND_SUBJECT}{_COPULA} {_NORMAL}\b", NEGATIVE),
        (rf"\b{_HEART}(?:{_AND_SUBJECT})? (?:is |are )?(?:of )?normal (?:size|in size|contour)", NEGATIVE),
        (rf"\b(?:normal|unremarkable)(?:[ -]sized)?(?: [a-z]+)?{_AND_SUBJECT} {_HEART}\b", NEGATIVE),
        (
            r"\bcardiomediastinal (?:silhouettes?|contours?)(?: (?:is|are|appears?|remains?))? (?:normal|within normal limits|unremarkable)\b",
            NEGATIVE,
        ),
        (r"\bnormal cardiomediastinal (?:silhouettes?|contours?)\b", NEGATIVE),
        (
            r"\bheart and mediastinum(?: are)? (?:normal|within normal limits|unremarkable|of normal size)",
            NEGATIVE,
        ),
        (r"\bsize is normal limits\b", NEGATIVE),
    ],
    # CheXpert's Lung Opacity list (its "airspace opacity" phrases); "pleural scar" is unmentioned
    # (`phrases/unmention/lung_opacity.txt`), and only it: "pleuroparenchymal scar" is both Lung Opacity
    # and Pleural Other, as in CheXpert.
    "Lung Opacity": [
        (r"\bopaci[a-z]*", None),
        (r"\b(?:decreased translucency|increased densit(?:y|ies))\b", None),
        (r"\bair[ -]?space disease\b", None),
        (r"\binfiltrat(?:e|es|ion|ions)\b", None),
        (r"\binterstitial (?:markings?|pattern|lung)\b", None),
        (r"\breticular (?:pattern|markings?)\b|\breticulation\b", None),
        (r"\b(?:peribronchial|wall) thickening\b", None),
        (r"(?<!pleural )\bscar[a-z]*", None),
    ],
    # CheXpert's Lung Lesion list; its unmention "calcified nodul" removes "calcified nodule(s)" and
    # "calcified nodular density / opacity"; "massive" and "Massengale" are not "mass".
    # Granulomas and metastases are not Lung Lesion mentions in CheXpert (they are "other findings").
    "Lung Lesion": [
        (r"\bmass(?:es|[ -]?like)?\b", None),
        (r"(?<!calcified )\b(?:micro)?nodules?\b", None),
        (r"(?<!calcified )\bnodular (?:densit(?:y|ies)|opaci(?:ty|ties|fication))\b", None),
        (r"\blumps?\b", None),
        (r"\bcavitary lesions?\b", None),
        (r"\b(?:carcinomas?|neoplasms?|tumou?rs?)\b", None),
    ],
    # CheXpert's Edema list. Its congestion / prominence / indistinctness phrases are always uncertain
    # unless negated (`_ALWAYS_UNCERTAIN`).
    "Edema": [
        (r"\bedema[a-z]*", None),
        (r"\b(?:heart failure|chf)\b", None),
        (r"\b(?:vascular|pulmonary) congestion\b", None),
        (r"\bindistinctness\b", None),
        (r"\bvascular prominence\b", None),
    ],
    "Consolidation": [
        (r"\bconsolidat[a-z]*", None),
    ],
    # CheXpert's Pneumonia list; a (prior) granulomatous infection is not read as pneumonia (README).
    "Pneumonia": [
        (r"\bpneumonia[a-z]*", None),
        (r"(?<!granulomatous )\binfecti(?:on|ons|ous)(?: process)?\b", None),
    ],
    "Atelectasis": [
        (r"\batelecta[a-z]*", None),
        (r"\bcollapse[a-z]*", None),
    ],
    "Pneumothorax": [
        (r"pneumothora(?:x|ces|xes)\b", None),
    ],
    # "pericardial effusion" is unmentioned.
    "Pleural Effusion": [
        (r"(?<!pericardial )\beffusions?\b", None),
        (r"\bpleural fluid\b", None),
    ],
    "Pleural Other": [
        (r"\bpleural thickening\b", None),
        (r"\bfibrosis\b|\bfibrothorax\b", None),
        (r"\b(?:pleural|pleural[ -]parenchymal|pleuro-?parenchymal|pleuro-?pericardial) scar[a-z]*", None),
    ],
    # A broken catheter, lead or wire is not a bone fracture (README).
    "Fracture": [
        (r"(?<!catheter )(?<!line )(?<!lead )(?<!wire )(?<!port )\bfractur[a-z]*", None),
    ],
    # CheXpert's Support Devices list, read as whole words; "line(s)", "valve" and "plate" only where
    # they name a device (README).
    "Support Devices": [
        (
            r"\b(?:pacers?|pacemakers?|picc|catheters?|mediports?|cannulas?|apparatus|coils?|equipment)\b",
            None,
        ),
        (r"\b(?:devices?|a?icds?|defib[a-z]*|hardware|arthroplast[a-z]*|screws?|markers?|support)\b", None),
        (r"\btubes?\b", None),
        (r"\bdrains?\b", None),
        (r"(?<!pleural )(?<!kerley )(?<!b )(?<!b-)(?<!septal )(?<!skin )(?<!lung )\blines?\b(?! of)", None),
        # Beyond CheXpert's list: implanted devices and a device tip (README).
        (r"\b(?:stimulators?|generators?|bone anchors?|surgical clips?|port-?a-?caths?|ports?)\b", None),
        (r"\b(?:distal )?tips? (?:projects?|projecting|overl(?:ies|ying)|terminat\w*|in|at|within)\b", None),
        (
            r"\b(?:prosthetic|mechanical|replaced|bioprosthetic) (?:\w+ )?valves?\b|\bvalve (?:replacement|prosthes[ie]s)\b",
            None,
        ),
        (r"\bplates?\b(?![ -]?like)", None),
    ],
}

# CheXpert's other findings (`phrases/mention/no_finding.txt`), matched as substrings as CheXpert matches them:
# they label no observation, but a positive or uncertain one leaves "No Finding" blank (`stages/aggregate.py`).
_NO_FINDING_MENTIONS = re.compile(
    r"emphysema|blunt|density|elevation|eventration|scoliosis|degenera|calcifi|hyperinflat|hyperexpansion|"
    r"bronchospasm|asthma|hernia|copd|interstitial markings|plaque|osteophytosis|aortic disease|bronchiolitis|"
    r"airways disease|thickening|cephalization|aspiration|bullae|contusion|atherosclero|osteopenia|metastasis|"
    r"granuloma|pneumomediastinum|pneumoperitoneum|osteodystrophy|cuffing|irregular lucency|inflam|fissure|"
    r"hypertension|prominen|kyphosis|defib|bullet|reticula|thoracentesis|bronchitis|volume loss|deformity|"
    r"hemorrhage|hematoma|radiopaque|aerophagia|arthropathy|tracheostomy"
)

# Mentions that CheXpert always reads as uncertain unless negated (`patterns/post_negation_uncertainty.txt`:
# its congestion / indistinctness / vascular prominence rules and its "borderline heart size" rule).
_ALWAYS_UNCERTAIN = re.compile(
    r"\b(?:(?:vascular|pulmonary) congestion|indistinctness|vascular prominence|"
    r"borderline (?:heart|cardiac)(?: size)?|(?:heart size|cardiac size|cardiac silhouette) (?:is )?(?:at )?(?:the )?borderline)\b"
)

# --------------------------------------------------------------------------------------------------
# Cues. "Pre" cues act on mentions after them in the same clause, the nearest one deciding;
# "post" cues act on the mention just before them (within a few words, same clause).
# --------------------------------------------------------------------------------------------------

_PSEUDO = re.compile(
    r"\b(?:no|without|not)(?: significant| appreciable| definite| interval| substantial| marked| apparent)*"
    r" (?:change|changes|changed|increase|decrease|decreased|worsening|improvement|progression|difference)\b"
    r"|\bnot (?:only|necessarily)\b|\bno longer\b(?= (?:enlarged|prominent))"
)
_DOUBLE_NEGATIVE_UNCERTAIN = re.compile(
    r"\b(?:can ?not|could not|can't|couldn't|not|unable to|difficult to|does not|cannot entirely|"
    r"can ?not (?:be )?(?:completely |entirely |fully )?)(?: be)?(?: entirely| completely| definitely| fully)?"
    r" (?:excluded|exclude|ruled out|rule out|be excluded|be ruled out|be entirely excluded)\b"
    # CheXpert's pre-negation uncertainty: "no evidence to rule out XXX".
    r"|\bno evidence to rule out\b"
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|"
    r"removal of|removed|clearing of|cleared|history of|(?:rather|xxxx) than|no evidence of|no signs? of|nor|neither|never|"
    r"no (?:radiographic |definite |convincing |acute |focal |visible |large |significant )*evidence (?:of|for)|"
    r"no (?:\w+ )?findings? (?:to suggest|suggest(?:ive|ing) of|of|for)|(?:is|are) negative|negative|"
    # CheXpert's negation patterns: "rule out XXX" and "exclude XXX" are negations (not uncertain);
    # "cannot rule out / exclude" is masked first as a double negative (uncertain).
    r"rule out|ruled out|to exclude|exclude|excluding|excludes)\b"
)
_PRE_UNCERTAIN = re.compile(
    # CheXpert's uncertainty words (`patterns/post_negation_uncertainty.txt`) ...
    r"\b(?:possible|possibly|probable|may|might|could|would|maybe|questionable|question(?:ed)? (?:of|for)|"
    r"suspicious (?:for|of)|suspect(?:ed)?|suspicion (?:for|of)|worrisome for|suggestion of|"
    r"concern(?:ing)? (?:for|of)|presumably|favou?r(?:s|ed|ing)?|secondary to|"
    r"versus|vs|differential diagnosis(?: includes?)?|consider(?:ed|ation)?|"
    r"may represent|may reflect|could represent|could reflect|correlate (?:clinically )?for|"
    r"can (?:represent|reflect|indicate|include|be due to|be related to|be consistent with)|"
    r"obscur(?:ing|ed|es)(?: the)?|(?:is|are|was|were|be|would|could|may) compatible with|"
    # ... and its pre-negation uncertainty "no new XXX" (nearer than the "no" it starts with). Hedges its
    # patterns lack ("likely", "probably", "presumed", "suggestive of", "equivocal", "indeterminate",
    # "evaluate for") are not cues: CheXpert calls "likely atelectasis" positive, and so does this labeler.
    r"no new)\b"
)
# CheXpert's post-negation uncertainty rules on what follows the mention; checked before the
# negations after it ("XXX is not appreciated", "XXX is not (well) visualized / evaluated", "XXX is not
# clearly seen", "XXX is poorly / incompletely evaluated", "XXX is obscured", "XXX may be present",
# "XXX could appear", "XXX may have this appearance").
_POST_UNCERTAIN_FIRST = re.compile(
    r"^(?: (?:\w+ ){0,3}?)?(?:is |are |was |were |has been |have been )?(?:"
    r"not (?:well )?(?:visualized|evaluated)|not clearly (?:seen|visualized)|not appreciated|"
    r"(?:poorly|incompletely) (?:evaluated|visualized)|obscured|"
    r"(?:may|might|could|can|possibly) (?:also )?(?:be present|appear|have this appearance)"
    r")\b"
)
_POST_NEGATION = re.compile(
    r"^(?:[ ,]*(?:\w+ ){0,4}?)(?:is |are |was |were |has |have |has been |have been )?"
    r"(?:(?:not|no longer) (?:\w+ )?(?:seen|identified|present|visible|demonstrated|evident|"
    r"noted|detected|apparent|definitely seen)|no longer (?:\w+ )?(?:visualized|appreciated)|"
    r"resolved|cleared|removed|absent|not enlarged|negative|now resolved|been removed|"
    # CheXpert: "XXX is excluded / ruled out", "XXX was previously demonstrated / visualized".
    r"excluded|ruled out|previously (?:demonstrated|visualized)|"
    r"(?:appears? |is |are |remains? )(?:within normal limits|within (?:the )?limits of normal|normal))\b"
)
_POST_UNCERTAIN = re.compile(
    # "... (on the left) is suspected / cannot be excluded": a few words, no comma, then the cue.
    r"^(?: (?:\w+ ){0,3}?)?(?:"
    r"(?:is |are |was |were )?(?:not |cannot be |can not be |could not be )(?:excluded|ruled out)|"
    r"(?:is |are |was |were |remains? |appears? |seems? )?(?:possible|suspected|questioned|probable|"
    r"in question|considered|a consideration|favou?red|less likely)"
    r")\b"
    # "A versus B" / "A?": only right after the mention.
    r"|^ (?:versus|vs)\b|^ ?\?"
)
_OR_BEFORE = re.compile(r"\b(?:and/)?or (?:[a-z-]+ ){0,2}$")
_OR_AFTER = re.compile(r"^ (?:and/)?or\b")
# Clause boundaries: the negation/uncertainty of one clause does not reach the next.
_CLAUSE_BOUNDARY = re.compile(
    r";|:| but | however| although | though | whereas | while | except | aside from | apart from |"
    r" other than | yet |, which | which | that is | that are |(?:,)? and (?:there|the|a|an|it|this|these) |"
    r", there | there (?:is|are) |, with (?!no )|\bwith (?=(?:a |an )?(?:mild|moderate|severe|small|large|new|"
    r"persistent|stable|increased|bilateral|left|right|minimal|trace) )|"
    r" (?:is|are) (?:again |now |still )?(?:seen|noted|present|identified) (?=(?:in|at|within|along|projecting|over) )"
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[a-z)])\.(?=[a-z])|\n+|(?<=\.)\s*(?=\d+\.\s)")


@dataclass(frozen=True)
class Mention:
    """One mention of an observation found in a report.

    Args:
        observation (`str`): one of `CHEXPERT_OBSERVATIONS`.
        label (`int`): 1 positive, 0 negative, -1 uncertain.
        text (`str`): the matched phrase.
        clause (`str`): the clause it was classified in.
    """

    observation: str
    label: int
    text: str
    clause: str


_COMPILED = {
    obs: [(re.compile(pattern), fixed) for pattern, fixed in patterns] for obs, patterns in _MENTIONS.items()
}
_COMPILED["No Finding"] = [(_NO_FINDING_MENTIONS, None)]


def _normalise(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return text


def split_sentences(text: str) -> list[str]:
    """Splits a report into lower-cased sentences (on ". ", "!", "?", new lines and "word.Word").

    Args:
        text (`str`): a report.

    Returns:
        `list[str]`: the non-empty sentences, lower-cased, with single spaces.
    """
    text = _normalise(text)
    # "normal.No" (missing space) is a sentence end; decimals ("1.5 cm") are not.
    text = re.sub(r"(?<=[a-z)])\.(?=[A-Z])", ". ", text)
    text = text.lower()
    # CheXpert's report cleaning (`loader/load.py`): "and/or" -> "or", and any "word/word" -> "word or word"
    # ("atelectasis/scarring" is "atelectasis or scarring"). The abbreviations r/o, w/o, h/o and s/p are
    # spelled out first, so that they do not become an "or".
    for abbreviation, words in (
        ("r/o", "rule out"),
        ("w/o", "without"),
        ("h/o", "history of"),
        ("s/p", "status post"),
    ):
        text = re.sub(rf"\b{abbreviation}\b", words, text)
    text = text.replace("and/or", "or")
    text = re.sub(r"(?<=[a-z])/(?=[a-z])", " or ", text)
    parts = _SENTENCE_SPLIT.split(text)
    return [p.strip(" .,") for p in parts if p and p.strip(" .,")]


def split_clauses(sentence: str) -> list[str]:
    """Splits a sentence into clauses at conjunctions and punctuation that end a negation's scope.

    Args:
        sentence (`str`): one lower-cased sentence.

    Returns:
        `list[str]`: the clauses (the boundary words themselves are dropped).
    """
    parts, start = [], 0
    for m in _CLAUSE_BOUNDARY.finditer(sentence):
        parts.append(sentence[start : m.start()])
        start = m.end()
    parts.append(sentence[start:])
    return [p.strip(" ,") for p in parts if p.strip(" ,")]


def _mask(pattern: re.Pattern, text: str) -> str:
    """Replaces each match of `pattern` with underscores (keeps offsets)."""
    return pattern.sub(lambda m: "_" * len(m.group(0)), text)


class _Clause:
    """A clause with its cues found once (so long, repetitive texts stay linear in their length)."""

    def __init__(self, text: str):
        self.text = text
        # Double negatives that mean uncertainty ("cannot be excluded") and pseudo-negations
        # ("no change in") are found first and masked so their "not"/"no" is not read as negation.
        self.double = [m.span() for m in _DOUBLE_NEGATIVE_UNCERTAIN.finditer(text)]
        self.masked = _mask(_DOUBLE_NEGATIVE_UNCERTAIN, _mask(_PSEUDO, text))
        cues = [(m.end(), NEGATIVE) for m in _PRE_NEGATION.finditer(self.masked)]
        cues += [(m.end(), UNCERTAIN) for m in _PRE_UNCERTAIN.finditer(self.masked)]
        cues += [(e, UNCERTAIN) for _, e in self.double]
        self.cues = sorted(cues)
        self.cue_ends = [e for e, _ in self.cues]

    def classify(self, start: int, end: int) -> int:
        """Classifies the mention `text[start:end]` as positive, negative or uncertain."""
        if any(end <= s <= end + 60 for s, _ in self.double):
            return UNCERTAIN
        # Negations inside the mention ("heart is not enlarged").
        if re.search(r"\b(?:not|no)\b", self.masked[start:end]):
            return NEGATIVE
        # The nearest cue before the mention decides (a negation wins a tie).
        index = bisect.bisect_right(self.cue_ends, start)
        if index:
            nearest = self.cue_ends[index - 1]
            return max(label for e, label in self.cues[:index] if e == nearest)
        # CheXpert: "A or B" (and "A and/or B") makes both uncertain unless a cue before decides.
        if _OR_BEFORE.search(self.masked[max(0, start - 40) : start]) or _OR_AFTER.match(
            self.masked[end : end + 40]
        ):
            return UNCERTAIN
        after = self.masked[end : end + 120]
        if _POST_UNCERTAIN_FIRST.match(after):
            return UNCERTAIN
        if _POST_NEGATION.match(after):
            return NEGATIVE
        if _POST_UNCERTAIN.match(after):
            return UNCERTAIN
        return POSITIVE


def find_mentions(text: str) -> list[Mention]:
    """Finds and classifies every observation mention in a report.

    Args:
        text (`str`): a report (findings and/or impression), any case.

    Returns:
        `list[Mention]`: the mentions in reading order.
    """
    mentions: list[Mention] = []
    for sentence in split_sentences(text or ""):
        for clause_text in split_clauses(sentence):
            clause = _Clause(clause_text)
            for observation, patterns in _COMPILED.items():
                for pattern, fixed in patterns:
                    for m in pattern.finditer(clause_text):
                        label = fixed if fixed is not None else clause.classify(m.start(), m.end())
                        if label == POSITIVE and _ALWAYS_UNCERTAIN.fullmatch(m.group(0)):
                            label = UNCERTAIN
                        mentions.append(Mention(observation, label, m.group(0), clause_text))
                        # CheXpert: a non-negated heart failure also makes Cardiomegaly uncertain.
                        if (
                            observation == "Edema"
                            and label != NEGATIVE
                            and m.group(0) in ("chf", "heart failure")
                        ):
                            mentions.append(Mention("Cardiomegaly", UNCERTAIN, m.group(0), clause_text))
    return mentions


def _aggregate(labels: Iterable[int]) -> int | None:
    labels = set(labels)
    for label in (POSITIVE, UNCERTAIN, NEGATIVE):
        if label in labels:
            return label
    return None


def label_report(text: str) -> dict[str, int | None]:
    """Labels one report with the 14 CheXpert observations.

    Args:
        text (`str`): a report (findings and/or impression), any case. An empty or blank report gets
            `None` for every observation, "No Finding" included.

    Returns:
        `dict[str, int | None]`: observation name -> 1 (positive), 0 (negative), -1 (uncertain) or
        None (not mentioned), over `CHEXPERT_OBSERVATIONS` in that order. "No Finding" is 1 or None, never 0.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"label_report expects a string report, got {type(text).__name__}: {text!r}")
    result: dict[str, int | None] = dict.fromkeys(CHEXPERT_OBSERVATIONS)
    if not text.strip():
        return result
    by_observation: dict[str, list[int]] = {}
    for mention in find_mentions(text):
        by_observation.setdefault(mention.observation, []).append(mention.label)
    other_finding = _aggregate(by_observation.pop("No Finding", [])) in (POSITIVE, UNCERTAIN)
    for observation, labels in by_observation.items():
        result[observation] = _aggregate(labels)
    finding = other_finding or any(result[o] in (POSITIVE, UNCERTAIN) for o in PATHOLOGY_OBSERVATIONS)
    # CheXpert (`stages/aggregate.py`) writes No Finding only as 1; where there is a finding it stays blank.
    result["No Finding"] = None if finding else POSITIVE
    return result


def label_reports(texts: Iterable[str]) -> list[dict[str, int | None]]:
    """Labels reports with the 14 CheXpert observations (see the module docstring for the rules).

    Args:
        texts (`Iterable[str]`): reports (findings and/or impression), any case.

    Returns:
        `list[dict[str, int | None]]`: one dict per report: observation name -> 1 (positive),
        0 (negative), -1 (uncertain) or None (not mentioned).
    """
    if isinstance(texts, str):
        raise ValueError("label_reports expects a list of reports, got a single string: wrap it in a list.")
    return [label_report(t) for t in texts]
