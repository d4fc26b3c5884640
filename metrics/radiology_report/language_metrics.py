"""Language metrics for radiology reports: R2Gen text normalisation and the pycocoevalcap scorers.

BLEU-1..4, ROUGE-L and CIDEr are pycocoevalcap's own scorers (`Bleu(4)`, `Rouge()`, `Cider()`), called
exactly as R2Gen (Chen et al., 2020) and CvT2DistilGPT2 (Nicolson et al., 2023) call them: corpus-level,
`{id: [prediction]}` against `{id: [reference, ...]}`, on whitespace-tokenised text. METEOR is
METEOR 1.5 (the jar shipped in pycocoevalcap, `-l en -norm`) spoken to over the same stdio protocol as
pycocoevalcap's `Meteor` wrapper, with four fixes that keep the numbers identical on normal input:

- Java is started once per process and closed at exit (`close_meteor()`), not once per call;
- each text is sanitised first: new lines and runs of spaces become one space and "|||" (the protocol's
  field separator) is removed, in predictions *and* references (pycocoevalcap only cleans predictions);
- each text is cut to `max_tokens` tokens for METEOR only (METEOR's aligner takes minutes on
  thousands of repetitive tokens, a common failure of generated reports);
- every read has a timeout; on a timeout or a Java crash the process is killed and METEOR is None.

PTBTokenizer (which needs Java and writes temporary files into its package folder) is not used: text is
normalised here and split on whitespace, which is the R2Gen protocol.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
from collections import deque

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("r2gen", "none")
LANGUAGE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")

# R2Gen's `clean_report_iu_xray` (modules/tokenizers.py of cuhksz-nlp/R2Gen), reproduced verbatim,
# except that empty sentences are dropped (R2Gen's `!= []` test compares a str with a list and never
# drops them, which turns an empty report into " .").
_R2GEN_SENTENCE_PUNCTUATION = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _r2gen_report_cleaner(t: str) -> list[str]:
    return (
        t.replace("..", ".")
        .replace("..", ".")
        .replace("..", ".")
        .replace("1. ", "")
        .replace(". 2. ", ". ")
        .replace(". 3. ", ". ")
        .replace(". 4. ", ". ")
        .replace(". 5. ", ". ")
        .replace(" 2. ", ". ")
        .replace(" 3. ", ". ")
        .replace(" 4. ", ". ")
        .replace(" 5. ", ". ")
        .strip()
        .lower()
        .split(". ")
    )


def _r2gen_sentence_cleaner(t: str) -> str:
    t = t.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _R2GEN_SENTENCE_PUNCTUATION.sub("", t)


def normalize_report(text: str, normalization: str = "r2gen") -> str:
    """Normalises and whitespace-tokenises a report for the n-gram metrics.

    Args:
        text (`str`): a report.
        normalization (`str`, *optional*, defaults to `"r2gen"`):
            - `"r2gen"`: R2Gen's IU X-ray cleaning: lower-case, numbering removed, punctuation stripped,
              sentences kept apart by a " . " token ("Heart is normal. No effusion." ->
              "heart is normal . no effusion ."). An empty or blank report stays empty.
            - `"none"`: the text as given, only split on whitespace.

    Returns:
        `str`: the tokens joined by single spaces.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"Reports must be strings, got {type(text).__name__}: {text!r}.")
    if normalization == "none":
        return " ".join(text.split())
    if normalization != "r2gen":
        raise ValueError(f"normalization={normalization!r} is not supported: use one of {NORMALIZATIONS}.")
    text = " ".join(text.split())
    if not text:
        return ""
    sentences = [_r2gen_sentence_cleaner(s) for s in _r2gen_report_cleaner(text)]
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        return ""
    return " ".join((" . ".join(sentences) + " .").split())


# --------------------------------------------------------------------------------------------------
# METEOR
# --------------------------------------------------------------------------------------------------


def meteor_jar_dir() -> str:
    """The folder holding pycocoevalcap's `meteor-1.5.jar` (and its paraphrase table)."""
    from pycocoevalcap.meteor import meteor as pycoco_meteor

    return os.path.dirname(os.path.abspath(pycoco_meteor.__file__))


METEOR_COMMAND = ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
"""pycocoevalcap's METEOR command line, unchanged."""


def sanitize_for_meteor(text: str, max_tokens: int | None = None) -> str:
    """Makes a text safe for METEOR's line protocol.

    Args:
        text (`str`): one prediction or reference.
        max_tokens (`int`, *optional*): keep at most this many whitespace tokens.

    Returns:
        `str`: the text on one line, without "|||", with single spaces, cut to `max_tokens` tokens.
    """
    tokens = text.replace("|||", "").split()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return " ".join(tokens)


class MeteorError(RuntimeError):
    """METEOR's Java process failed, timed out or could not start."""


class MeteorScorer:
    """A long-lived METEOR 1.5 Java process, spoken to like pycocoevalcap's `Meteor`.

    Args:
        timeout (`float`, *optional*, defaults to 120): seconds to wait for any single answer from Java
            (the first one includes the start of Java and the loading of the paraphrase table).
        max_tokens (`int`, *optional*, defaults to 256): texts are cut to this many tokens for METEOR.
    """

    def __init__(self, timeout: float = 120.0, max_tokens: int | None = 256):
        if shutil.which("java") is None:
            raise MeteorError(
                "java was not found on PATH: install a Java runtime (e.g. openjdk-17-jre) for METEOR."
            )
        self.timeout = timeout
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=20)
        self.process = subprocess.Popen(
            METEOR_COMMAND,
            cwd=meteor_jar_dir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in iter(self.process.stdout.readline, b""):
            self._lines.put(line)
        self._lines.put(b"")  # EOF

    def _pump_stderr(self) -> None:
        for line in iter(self.process.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _write(self, line: str) -> None:
        self.process.stdin.write((line + "\n").encode("utf-8"))
        self.process.stdin.flush()

    def _readline(self) -> str:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise MeteorError(
                f"METEOR gave no answer within {self.timeout} s; the Java process was stopped."
            ) from None
        if not line:
            self.close()
            raise MeteorError("METEOR's Java process exited: " + " | ".join(self._stderr))
        return line.decode("utf-8", "replace").strip()

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        """Scores `res` ({id: [prediction]}) against `gts` ({id: [references]}), as pycocoevalcap does.

        Returns:
            `tuple[float, list[float]]`: the corpus METEOR and the per-item scores.
        """
        if gts.keys() != res.keys():
            raise ValueError("METEOR needs the same ids in predictions and references.")
        with self._lock:
            if not self.alive:
                raise MeteorError("METEOR's Java process is not running.")
            try:
                stats = []
                for key in gts:
                    hypothesis = sanitize_for_meteor(res[key][0], self.max_tokens)
                    references = [sanitize_for_meteor(r, self.max_tokens) for r in gts[key]]
                    self._write(" ||| ".join(("SCORE", " ||| ".join(references), hypothesis)))
                    stats.append(self._readline())
                self._write("EVAL ||| " + " ||| ".join(stats))
                scores = [float(self._readline()) for _ in stats]
                score = float(self._readline())
            except (BrokenPipeError, OSError, ValueError) as error:
                self.close()
                raise MeteorError(f"METEOR failed: {error}; " + " | ".join(self._stderr)) from error
        return score, scores

    def close(self) -> None:
        """Stops the Java process (idempotent)."""
        process = getattr(self, "process", None)
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.close()
            except OSError:
                pass
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("METEOR's Java process (pid %s) did not exit after kill.", process.pid)
        for stream in (process.stdout, process.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def __del__(self):
        self.close()


_METEOR: MeteorScorer | None = None
_METEOR_LOCK = threading.Lock()
_JAVA_WARNED = False


def get_meteor(timeout: float = 120.0, max_tokens: int | None = 256) -> MeteorScorer | None:
    """The shared METEOR process (started on first use), or None with one warning when Java is missing.

    Args:
        timeout (`float`, *optional*, defaults to 120): seconds to wait for any single answer.
        max_tokens (`int`, *optional*, defaults to 256): texts are cut to this many tokens for METEOR.
    """
    global _METEOR, _JAVA_WARNED
    with _METEOR_LOCK:
        if _METEOR is None or not _METEOR.alive:
            try:
                _METEOR = MeteorScorer(timeout=timeout, max_tokens=max_tokens)
            except (MeteorError, OSError) as error:
                if not _JAVA_WARNED:
                    logger.warning("METEOR is reported as None: %s", error)
                    _JAVA_WARNED = True
                return None
        _METEOR.timeout = timeout
        _METEOR.max_tokens = max_tokens
        return _METEOR


def close_meteor() -> None:
    """Stops the shared METEOR Java process if it runs (also called at interpreter exit)."""
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is not None:
            _METEOR.close()
            _METEOR = None


atexit.register(close_meteor)


# --------------------------------------------------------------------------------------------------
# Corpus scores
# --------------------------------------------------------------------------------------------------


def coco_inputs(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """The `gts`, `res` dicts the pycocoevalcap scorers take: `{i: [refs...]}`, `{i: [prediction]}`."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    return gts, res


def compute_language_scores(
    predictions: list[str],
    references: list[list[str]],
    meteor: bool = True,
    meteor_timeout: float = 120.0,
    meteor_max_tokens: int | None = 256,
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap's scorers, corpus-level.

    Args:
        predictions (`list[str]`): tokenised predictions (tokens joined by single spaces); "" is an empty
            prediction and is scored as such.
        references (`list[list[str]]`): tokenised references, one or several per prediction.
        meteor (`bool`, *optional*, defaults to True): compute METEOR (needs Java; None without it).
        meteor_timeout (`float`, *optional*, defaults to 120): seconds to wait for each METEOR answer.
        meteor_max_tokens (`int`, *optional*, defaults to 256): texts are cut to this length for METEOR.

    Returns:
        `dict`: `bleu_1`..`bleu_4`, `meteor`, `rouge_l`, `cider` (floats; `meteor` may be None).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("No predictions to score: pass at least one prediction/reference pair.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references: pass one entry each."
        )
    gts, res = coco_inputs(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    if any(r.strip() for refs in references for r in refs):
        cider, _ = Cider().compute_score(gts, res)
    else:  # CIDEr's document frequencies are undefined without a single reference n-gram
        logger.warning("Every reference is empty: CIDEr is reported as 0.")
        cider = 0.0
    scores: dict[str, float | None] = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    scores["meteor"] = None
    if meteor:
        scorer = get_meteor(timeout=meteor_timeout, max_tokens=meteor_max_tokens)
        if scorer is not None:
            try:
                scores["meteor"] = float(scorer.compute_score(gts, res)[0])
            except MeteorError as error:
                logger.warning("METEOR is reported as None: %s", error)
    scores["rouge_l"] = float(rouge)
    scores["cider"] = float(cider)
    return scores
