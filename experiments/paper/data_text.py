"""Text clean-up and tokenisation for the task loaders.

The authors tokenised raw text with spaCy's English tokenizer, lowercased it and replaced every token that
contains a digit by ``qqq`` (their ``cleaner``). spaCy is not a dependency here; ``tokenize`` is a small
regular-expression tokenizer that makes the same kind of cuts (punctuation split off, ``n't`` and the ``'s``,
``'re``, ``'ve``, ``'ll``, ``'d``, ``'m`` clitics split off, hyphens between words split), so vocabularies are
close to, not identical with, the authors'.
"""
from __future__ import annotations

import html
import re

DIGIT_TOKEN = "qqq"

_TOKEN_RE = re.compile(
    r"""
      https?://\S+|www\.\S+                 # web addresses stay whole
    | [a-z]+(?=n't\b)                       # "don't" -> "do" + "n't"; "can't" -> "ca" + "n't"
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b                 # clitics after a word: "it's" -> "it" + "'s"
    | \d+(?:[.,:/]\d+)+                     # numbers such as 3.5, 1,000, 9/11, 10:30 stay whole
    | [^\W\d_](?:\.[^\W\d_])+\.?(?!\w)      # abbreviations such as u.s. and e.g.
    | [^\W_]+                               # words (letters and digits)
    | \.\.\.+|--+|[!?]+                     # runs of dots, dashes, !/? stay one token
    | \S                                    # any other character is a token of its own
    """,
    re.VERBOSE,
)
_BR_TAG_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_NUMERIC_ENTITY_RE = re.compile(r"&?#(\d{2,4});")
_NON_WORD_RUN_RE = re.compile(r"(\W)+")


_DIGIT_RE = re.compile(r"\d")
_ALNUM_RE = re.compile(r"[^\W_]")


def replace_digit_tokens(tokens: list[str]) -> list[str]:
    """Tokens that contain a digit become ``qqq`` (the authors' rule for numbers, years, scores)."""
    return [DIGIT_TOKEN if _DIGIT_RE.search(token) else token for token in tokens]


def _tokens(text: str, keep_punctuation: bool) -> list[str]:
    # IMDB alone has 12M tokens: method look-ups are hoisted, and the regular expression (slow in Python's
    # engine) only sees chunks that the fast paths below cannot settle with the same result
    tokens: list[str] = []
    append = tokens.append
    findall = _TOKEN_RE.findall
    has_digit = _DIGIT_RE.search
    has_alnum = _ALNUM_RE.search
    for chunk in text.lower().split():
        if chunk.isalpha():  # a plain word
            append(chunk)
        elif chunk[:-1].isalpha() and not chunk[-1].isalnum():  # a word and one closing mark: "time," "film."
            append(chunk[:-1])
            if keep_punctuation:
                append(chunk[-1])
        else:
            for token in findall(chunk):
                if has_digit(token):
                    append(DIGIT_TOKEN)
                elif keep_punctuation or has_alnum(token):
                    append(token)
    return tokens


def tokenize(text: str) -> list[str]:
    """Lowercase, tokenise (spaCy-like cuts, see the module docstring), digits -> ``qqq``."""
    return _tokens(text, keep_punctuation=True)


def clean_imdb(text: str) -> str:
    """The raw aclImdb reviews carry HTML line breaks (``<br />``); they become spaces."""
    return _BR_TAG_RE.sub(" ", text)


def tokenize_imdb(text: str) -> list[str]:
    """IMDB words: the authors used the Keras copy of IMDB, whose reviews are lowercased words with the
    punctuation removed; keeping only word tokens makes the 400-token length limit select the same kind
    of documents."""
    return _tokens(clean_imdb(text), keep_punctuation=False)


def clean_agnews(text: str) -> str:
    """AG News descriptions carry HTML remnants (``#39;`` for an apostrophe, ``&lt;b&gt;``, ``quot;``) and a
    literal backslash where the crawl had a line break."""
    text = _NUMERIC_ENTITY_RE.sub(lambda m: chr(int(m.group(1))), text)
    text = text.replace(" quot;", ' "').replace("\\", " ")
    return html.unescape(text)


def tokenize_newsgroups(text: str) -> list[str]:
    """The authors' 20 Newsgroups clean-up: their ``cleaner`` (tokenise, lowercase, digits -> qqq), then in
    the space-joined text every run of non-word characters becomes its last character alone. Since the
    spaces belong to the runs, a punctuation token between spaces disappears ("great !" -> "great"), one at
    the very end stays, and marks inside a token split it ("n't" -> "n ' t")."""
    joined = " ".join(tokenize(text))
    return _NON_WORD_RUN_RE.sub(r" \1 ", joined).split()


# --- 20 Newsgroups: the header / footer / quote removal of scikit-learn's fetch_20newsgroups(remove=...) ----

_QUOTE_LINE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_newsgroup_header(text: str) -> str:
    """Everything up to the first blank line is the header."""
    return text.partition("\n\n")[2]


def strip_newsgroup_footer(text: str) -> str:
    """The signature starts at the last line that is blank or made of hyphens (scikit-learn's heuristic,
    including its quirk that the text is returned unchanged when that line is the first one)."""
    lines = text.strip().split("\n")
    cut = 0
    for cut in range(len(lines) - 1, -1, -1):
        if lines[cut].strip().strip("-") == "":
            break
    return "\n".join(lines[:cut]) if cut > 0 else text


def strip_newsgroup_quoting(text: str) -> str:
    """Lines that quote another post (``>`` or ``|`` first) or introduce a quote (``... writes:``) go."""
    return "\n".join(line for line in text.split("\n") if not _QUOTE_LINE_RE.search(line))


def clean_newsgroup_post(text: str) -> str:
    """Headers, footers and quotes removed, in scikit-learn's order."""
    return strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(text)))
