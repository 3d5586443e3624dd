"""Clean-up of raw captions: `clean_caption(text, style)`, and the text the retry rule reads.

`basic` (`caption --clean`): drop bracketed text (nested brackets too), cut back to the last `.` or `,` (a
final `.` kept, a final `,` dropped; text with neither kept whole), collapse whitespace.

`origin` (`--clean --clean-style origin`, `--preset origin`): what the origin script (`inference.py` of
mnemic/paligemma-longprompt-v1) writes for a decoded caption, step by step in its order:

1. prune: cut at the last `.` or `,`, the mark itself dropped, and strip (text with neither: kept as it is);
2. replace each of ORIGIN_REMOVE, in that order, with a space;
3. replace `(...)`, `[...]`, `{...}` (each up to its first closing bracket, so a nested pair leaves its tail;
   an unclosed bracket stays) with a space; collapse runs of 2+ whitespace to one space; drop the space before
   `, . ! ? ;`; make the whitespace after one of them a single space; strip;
4. at the first word longer than ORIGIN_MAX_WORD characters, cut back to the last `.` or `,` before that
   word's first occurrence (or to just before it, when there is none), and strip;
5. remove non-ASCII characters; collapse whitespace and strip;
6. drop every word that contains `_` (booru tags such as `no_humans`).

The origin decides whether to caption again on the pruned text (step 1): fewer than 20 words, or one of its
retry words (`no_parallel`) in it.
"""

from __future__ import annotations

import re

STYLES = ("basic", "origin")
ORIGIN_REMOVE = ("#", "/", "、", "@", "__", "|", "  ", ";", "~", '"', "*", "^", ",,", "ON DISPLAY:")
ORIGIN_MAX_WORD = 30
ORIGIN_RETRY_WORDS = ("no_parallel",)

_BRACKETED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}")
_ORIGIN_BRACKETS = (re.compile(r"\([^)]*\)"), re.compile(r"\[[^\]]*\]"), re.compile(r"\{[^}]*\}"))


def clean_caption(text: str, style: str = "basic") -> str:
    """A raw decoded caption cleaned up in `style` ("basic" or "origin": see the module docstring)."""
    if style == "basic":
        return _basic(text)
    if style == "origin":
        return _origin(prune(text))
    raise ValueError(f"unknown clean-up style {style!r}: {' or '.join(STYLES)}")


def prune(text: str) -> str:
    """The origin's first step: up to (not including) the last `.` or `,`, stripped; text with neither as it is."""
    cut = max(text.rfind("."), text.rfind(","))
    return text[:cut].strip() if cut >= 0 else text


def retry_text(text: str, style: str | None) -> str:
    """The text `--min-words` and `--retry-words` read: the pruned raw caption with the origin style (where the
    origin reads it), else the caption as written (the style's clean-up applied)."""
    if style == "origin":
        return prune(text)
    return clean_caption(text, style) if style else text


def _basic(text: str) -> str:
    previous = None
    while previous != text:  # nested brackets: innermost first
        previous, text = text, _BRACKETED.sub("", text)
    cut = max(text.rfind("."), text.rfind(","))
    if cut >= 0:
        text = text[: cut + 1] if text[cut] == "." else text[:cut]
    return re.sub(r"\s+", " ", text).strip()


def _origin(text: str) -> str:
    for mark in ORIGIN_REMOVE:
        text = text.replace(mark, " ")
    for brackets in _ORIGIN_BRACKETS:
        text = brackets.sub(" ", text)
    text = re.sub(r"\s{2,}", " ", text)
    text = re.sub(r"\s([,.!?;])", r"\1", text)
    text = re.sub(r"([,.!?;])\s", r"\1 ", text).strip()
    text = _cut_at_long_word(text)
    text = re.sub(r"[^\x00-\x7F]+", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return " ".join(word for word in text.split() if "_" not in word)


def _cut_at_long_word(text: str) -> str:
    for word in text.split():
        if len(word) > ORIGIN_MAX_WORD:
            at = text.find(word)
            cut = max(text.rfind(".", 0, at), text.rfind(",", 0, at))
            return (text[:cut] if cut >= 0 else text[:at]).strip()
    return text


MAX_TAG_WORDS = 4  # a leading comma-separated item with more words than this starts the description
UNDERSCORES = ("keep", "spaces", "drop")


def filter_tags(text: str, exclude: tuple[str, ...] = (), underscores: str = "keep", max_tags: int = 0) -> str:
    """The caption with its tag prefix filtered: tags in `exclude` dropped, underscores kept, made spaces or the
    tags holding one dropped, duplicates dropped, at most `max_tags` kept (0: all); the description after the
    tags is kept as it is.

    The tag prefix is the caption's leading comma-separated items, up to the first one with more than
    MAX_TAG_WORDS words or a sentence mark (. ! ?): that item and the rest are the description. Tags compare
    without case, an underscore the same as a space."""
    if underscores not in UNDERSCORES:
        raise ValueError(f"unknown underscore rule {underscores!r}: {', '.join(UNDERSCORES)}")
    items = text.split(",")
    count = 0
    while count < len(items) and _is_tag(items[count]):
        count += 1
    tags, rest = [item.strip() for item in items[:count]], ",".join(items[count:]).strip()
    unwanted = {_tag_key(tag) for tag in exclude}
    kept: list[str] = []
    for tag in tags:
        if underscores == "drop" and "_" in tag:
            continue
        tag = tag.replace("_", " ") if underscores == "spaces" else tag
        if tag and _tag_key(tag) not in unwanted and _tag_key(tag) not in {_tag_key(k) for k in kept}:
            kept.append(tag)
    kept = kept[:max_tags] if max_tags else kept
    return ", ".join(kept + ([rest] if rest else []))


def _is_tag(item: str) -> bool:
    return len(item.split()) <= MAX_TAG_WORDS and not any(mark in item for mark in ".!?")


def _tag_key(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())
