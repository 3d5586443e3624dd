"""Clean-up of raw captions (`palionnx.clean_caption`): the origin script's steps one by one, on hand-written raw
captions with the origin's output worked out by hand, the basic style, and the retry rule that reads them."""

import pytest

from palionnx import clean_caption
from palionnx.jobs.cleanup import ORIGIN_REMOVE, prune, retry_text
from palionnx.runtime.captioner import CaptionResult
from palionnx.runtime.stream import Retry


@pytest.mark.parametrize(("raw", "written"), [
    # 1. prune: cut at the last "." or ",", the mark dropped; text with neither kept as it is
    ("a cat, on a mat. and then som", "a cat, on a mat"),
    ("tag1, tag2, a cat sits,", "tag1, tag2, a cat sits"),
    ("a cat on a mat", "a cat on a mat"),
    # 3. brackets up to their first closing one (a nested pair leaves its tail), an unclosed one stays
    ("a cat (sitting) on [a] mat {x}, end", "a cat on mat"),
    ("a (b (c) d) e, end", "a d) e"),
    ("a (b c, end", "a (b c"),
    # 3. no space before , . ! ? ; and one (whitespace made a space) after them
    ("a cat , on a mat . and ! more, end", "a cat, on a mat. and! more"),
    ("x, a,\tb, end", "x, a, b"),
    # 4. a word of 30 characters stays; one of 31 cuts back to the "." or "," before it, or to just before it
    ("tags, one two, " + "a" * 30 + " end. tail", "tags, one two, " + "a" * 30 + " end"),
    ("first part. second, " + "b" * 31 + " more. tail", "first part. second"),
    ("b" * 31 + " rest. tail", ""),
    # 5. non-ASCII characters removed
    ("café au lait, end", "caf au lait"),
    ("naïve 日本 text, x", "nave text"),
    # 6. words with an underscore dropped (booru tags)
    ("no_humans, 1girl, solo_focus, a girl standing. tail", "1girl, a girl standing"),
    # empty results
    ("", ""),
    ("(all bracketed), x", ""),
])
def test_origin_clean_up_step_by_step(raw, written):
    assert clean_caption(raw, "origin") == written


@pytest.mark.parametrize("mark", ORIGIN_REMOVE)
def test_each_origin_remove_word_becomes_a_space(mark):
    assert clean_caption(f"left{mark}right, end", "origin") == "left right"


def test_a_booru_style_caption_through_every_origin_step():
    raw = 'no_humans, scenery, a waterfall #nature in a forest (photo) ; the water is "blue"*. the end is cut'
    assert clean_caption(raw, "origin") == "scenery, a waterfall nature in a forest the water is blue"


def test_basic_is_the_clean_up_palionnx_had():
    assert clean_caption("a cat (maybe) on a [red] mat, with a") == "a cat on a mat"
    assert clean_caption("tags, more tags. a long   sentence that was cut") == "tags, more tags."
    assert clean_caption("nested (a (b) c) done.") == "nested done."
    assert clean_caption("no_humans, café", "basic") == "no_humans"  # cut at the last ",": nothing else dropped
    with pytest.raises(ValueError, match="unknown clean-up style 'fancy': basic or origin"):
        clean_caption("x", "fancy")


def test_the_retry_rule_reads_the_pruned_caption_with_the_origin_style():
    raw = "one two three four, five six (seven) eight_nine"
    assert prune(raw) == "one two three four" and retry_text(raw, "origin") == "one two three four"
    assert retry_text(raw, "basic") == "one two three four" and retry_text(raw, None) == raw
    origin = Retry(min_words=4, retries=2, reads=lambda text: retry_text(text, "origin"), retry_words=("no_parallel",))
    assert not origin.unfit(raw)
    assert origin.unfit("one two three, four five six")  # three words before the last ","
    assert origin.unfit("a no_parallel b c d e, f")  # a retry word in the pruned text
    assert not origin.unfit("a b c d e, no_parallel")  # ... but not in the part pruned away


def test_keep_the_longest_or_the_last_attempt():
    short, long_ = CaptionResult(source="x", text="a b"), CaptionResult(source="x", text="a b c d")
    later = CaptionResult(source="x", text="a", attempts=3)
    assert Retry(5, 3).better(long_, later).text == "a b c d"
    assert Retry(5, 3, keep_last=True).better(long_, later).text == "a"
    assert Retry(5, 3).better(short, long_).text == "a b c d" and Retry(5, 3).better(long_, later).attempts == 3


def test_the_readme_examples():
    assert clean_caption("no_humans, a waterfall #nature (photo). cut off", "origin") == "a waterfall nature"
    assert clean_caption("(photo) a waterfall. cut off") == "a waterfall."


def test_tag_filters_act_on_the_leading_tags_only():
    from palionnx.jobs.cleanup import filter_tags

    caption = "1girl, solo, long_hair, Solo, no_humans, the image shows a girl. more, text"
    assert filter_tags(caption) == "1girl, solo, long_hair, no_humans, the image shows a girl. more, text"
    assert filter_tags(caption, exclude=("No Humans", "solo")) == "1girl, long_hair, the image shows a girl. more, text"
    spaced = filter_tags(caption, underscores="spaces")
    assert spaced == "1girl, solo, long hair, no humans, the image shows a girl. more, text"
    assert filter_tags(caption, underscores="drop", max_tags=1) == "1girl, the image shows a girl. more, text"
    # an item of more than four words, or with a sentence mark, starts the description
    assert filter_tags("a, a, five words make a sentence, a") == "a, five words make a sentence, a"
    assert filter_tags("red, Red. blue, blue") == "red, Red. blue, blue"
    assert filter_tags("") == "" and filter_tags("no tags at all in this caption") == "no tags at all in this caption"
    with pytest.raises(ValueError, match="unknown underscore rule"):
        filter_tags("a", underscores="camel")


def test_tag_lists_from_the_command_line_or_a_file(tmp_path):
    from palionnx.jobs.checks import CheckError, tag_list

    (tmp_path / "tags.txt").write_text("watermark\nsignature, text\n\n")
    assert tag_list(" watermark, signature ,") == ("watermark", "signature")
    assert tag_list(f"@{tmp_path / 'tags.txt'}") == ("watermark", "signature", "text")
    with pytest.raises(CheckError, match="cannot read the tag file"):
        tag_list(f"@{tmp_path / 'missing.txt'}")


def test_clean_takes_a_style_as_its_value_and_leaves_a_folder_alone():
    from palionnx.cli.launcher import clean_styles

    assert clean_styles(["caption", "in", "--clean", "origin"]) == ["caption", "in", "--clean", "--clean-style",
                                                                   "origin"]
    assert clean_styles(["caption", "--clean=basic", "in"]) == ["caption", "--clean", "--clean-style", "basic", "in"]
    assert clean_styles(["caption", "--clean", "in/", "-o", "x"]) == ["caption", "--clean", "in/", "-o", "x"]
    assert clean_styles(["caption", "in", "--clean"]) == ["caption", "in", "--clean"]
    assert clean_styles(["caption", "--", "--clean", "origin"]) == ["caption", "--", "--clean", "origin"]
