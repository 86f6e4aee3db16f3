"""Streaming detokenization: exact text, multi-byte characters, stop strings."""

from toyllm_core.serving.detokenize import TextStream


def test_streamed_text_equals_decoded_text(tokenizer):
    text = "Héllo wörld 😀 naïve café — ok.\nNew line"
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) + stream.finish() == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_ends_the_text_before_it(tokenizer):
    stream = TextStream(tokenizer, stop=("END", "\n\n"))
    out = ""
    for t in tokenizer.encode("alpha beta ENDgamma"):
        out += stream.push(t)
        if stream.stopped:
            break
    assert stream.stopped and out + stream.finish() == "alpha beta "


def test_special_tokens_add_no_text(tokenizer):
    eos = tokenizer.eos_token_id
    stream = TextStream(tokenizer)
    ids = tokenizer.encode("Hello") + [eos] + tokenizer.encode(" café") + [eos]
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.finish() == "Hello café"
    assert stream.ids == ids  # the tokens themselves are all kept
