"""The NLP pieces the CHAIR-family metrics need, injectable, and their absence a clear error.

Object HalBench and AMBER tokenise, POS-tag and lemmatise with NLTK (``word_tokenize``, ``pos_tag``,
``WordNetLemmatizer``) and AMBER compares words with spaCy vectors (``en_core_web_lg``). napo calls them
through :class:`TextTools` (NLTK) and a similarity function (spaCy), so that a test or a user can pass
their own; the defaults load the real libraries and, when a library or its data is missing, raise one
:class:`NlpUnavailable` naming what to install or where to point, before any answer is generated.
napo never downloads NLTK data or spaCy models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Similarity = Callable[[str, str], float]

NLTK_DATA_HINT = (
    "install it where a network is reachable (python -m nltk.downloader punkt punkt_tab wordnet omw-1.4 "
    "averaged_perceptron_tagger averaged_perceptron_tagger_eng) and copy that folder here, pointing the "
    "NLTK_DATA environment variable at it"
)


class NlpUnavailable(ImportError):
    """A library or the data (NLTK corpora, a spaCy model) a metric needs is absent; the message says what
    to install or point to."""


@dataclass(frozen=True)
class TextTools:
    """tokenize(text) -> words; lemmatize(word) -> lemma; pos_tag(words) -> [(word, Penn tag)]."""

    tokenize: Callable[[str], list[str]]
    lemmatize: Callable[[str], str]
    pos_tag: Callable[[list[str]], list[tuple[str, str]]] | None = None


def nltk_tools(need_tagger: bool = False) -> TextTools:
    """NLTK's ``word_tokenize``, ``WordNetLemmatizer().lemmatize`` (and ``pos_tag``), checked once on a
    sentence so that missing data is reported now, not in the middle of scoring."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise NlpUnavailable("NLTK is not installed: pip install nltk (or pip install 'napo[eval-nlp]')") from None
    lemmatizer = WordNetLemmatizer()
    tools = TextTools(
        tokenize=nltk.word_tokenize, lemmatize=lemmatizer.lemmatize, pos_tag=nltk.pos_tag if need_tagger else None
    )
    try:
        words = tools.tokenize("Two dogs sit on a bench.")
        tools.lemmatize("dogs")
        if need_tagger:
            tools.pos_tag(words)
    except LookupError as error:
        first = next((line.strip() for line in str(error).splitlines() if "Resource" in line), "")
        raise NlpUnavailable(f"NLTK's data is missing ({first or 'a resource'}); {NLTK_DATA_HINT}") from None
    return tools


def spacy_similarity(model: str = "en_core_web_lg") -> Similarity:
    """similarity(a, b) = spaCy's ``nlp(a).similarity(nlp(b))`` with the vectors of ``model`` (AMBER's)."""
    try:
        import spacy
    except ImportError:
        raise NlpUnavailable("spaCy is not installed: pip install spacy (or pip install 'napo[eval-nlp]')") from None
    try:
        nlp = spacy.load(model)
    except OSError:
        raise NlpUnavailable(
            f"the spaCy model {model!r} is not installed: install its wheel (python -m spacy download {model} "
            "where a network is reachable, or pip install the downloaded en_core_web_lg-*.whl)"
        ) from None
    cache: dict[str, object] = {}

    def similarity(first: str, second: str) -> float:
        docs = [cache.setdefault(word, nlp(word)) for word in (first, second)]
        return float(docs[0].similarity(docs[1]))

    return similarity
