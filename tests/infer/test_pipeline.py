"""The segmentation pipeline on the tiny random model: answers, masks, cache, inputs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lisa_demo.infer.pipeline import (
    MAX_IMAGE_PIXELS,
    NO_SEG_MESSAGE,
    InputError,
    LisaPipeline,
    load_image,
)

QUESTION = "Can you segment the red square in this image?"
TWO_SEG = "Sure, [SEG] and [SEG]."


@pytest.fixture
def pipeline(tiny_loaded) -> LisaPipeline:
    return LisaPipeline(tiny_loaded, max_new_tokens=12)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height but holds almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# Segmenting ---------------------------------------------------------------------------------
def test_segment_returns_answer_masks_scores_and_timings(pipeline, tiny_loaded, force_answer):
    force_answer(tiny_loaded, TWO_SEG)
    image = np.zeros((37, 53, 3), dtype=np.uint8)
    image[5:20, 10:30] = 255
    result = pipeline.segment(image, QUESTION)
    assert result.answer == TWO_SEG
    assert len(result.masks) == 2
    for mask in result.masks:
        assert mask.mask.dtype == np.bool_ and mask.mask.shape == (37, 53)
        assert isinstance(mask.score, float) and np.isfinite(mask.score)
        assert mask.area_fraction == pytest.approx(mask.mask.mean())
        assert mask.logits is None
    assert set(result.timings) == {"image_encoding", "generation", "mask_decoding", "total"}
    assert all(v >= 0 for v in result.timings.values())
    stages = sum(result.timings[k] for k in ("image_encoding", "generation", "mask_decoding"))
    assert result.timings["total"] >= stages
    assert result.cache_hit is False
    assert result.message is None or "empty" in result.message


def test_seg_states_from_generation_match_a_teacher_forced_pass(
    pipeline, tiny_loaded, force_answer, make_inputs, scene_image
):
    """The [SEG] states taken from generate() give the masks of LisaModel.forward on the same
    prompt + answer, i.e. the generation picks the states just before each [SEG]."""
    force_answer(tiny_loaded, TWO_SEG)
    result = pipeline.segment(scene_image, QUESTION, keep_logits=True)
    with torch.inference_mode():
        out = tiny_loaded.model(**make_inputs(tiny_loaded, scene_image, QUESTION, TWO_SEG))
    expected = out.mask_logits[0].numpy()
    assert expected.shape[0] == 2
    got = np.stack([m.logits for m in result.masks])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose([m.score for m in result.masks], out.scores[0].numpy(), atol=1e-4)
    # The two [SEG] tokens sit at different positions, so their masks differ.
    assert not np.allclose(got[0], got[1])


def test_threshold_selects_pixels_above_it(pipeline, tiny_loaded, force_answer, scene_image):
    force_answer(tiny_loaded, "[SEG].")
    low = pipeline.segment(scene_image, QUESTION, threshold=-1e9, keep_logits=True).masks[0]
    assert low.mask.all() and low.area_fraction == 1.0
    cut = float(np.median(low.logits))
    mid = pipeline.segment(scene_image, QUESTION, threshold=cut).masks[0]
    np.testing.assert_array_equal(mid.mask, low.logits > cut)
    high = pipeline.segment(scene_image, QUESTION, threshold=1e9)
    assert not high.masks[0].mask.any()
    # Numbered from 1, the threshold said as a probability (a logit of 1e9 is 1.00).
    assert high.message.startswith("Mask 1 is empty: no pixel has a mask probability above 1.00")
    assert "try a lower threshold" in high.message


def test_many_seg_tokens_are_called_degenerate_not_a_threshold_problem(
    tiny_loaded, force_answer, scene_image
):
    force_answer(tiny_loaded, "Sure," + " [SEG] and" * 6 + " [SEG].")
    pipeline = LisaPipeline(tiny_loaded, max_new_tokens=48)
    result = pipeline.segment(scene_image, QUESTION, threshold=1e9)
    assert len(result.masks) == result.answer.count("[SEG]") == 7
    assert "The answer has 7 [SEG] tokens" in result.message
    assert "7 of its masks are empty" in result.message
    assert "try a lower threshold" not in result.message


def test_probability_and_logit_thresholds_convert_both_ways():
    from lisa_demo.infer.pipeline import logit_to_probability, probability_to_logit

    assert probability_to_logit(0.5) == 0.0
    assert probability_to_logit(0.9) == pytest.approx(np.log(9.0))
    assert logit_to_probability(np.log(9.0)) == pytest.approx(0.9)
    assert logit_to_probability(1e9) == 1.0 and logit_to_probability(-1e9) == 0.0
    assert np.isfinite(probability_to_logit(0.0)) and np.isfinite(probability_to_logit(1.0))


def test_second_query_on_same_image_hits_the_cache(
    pipeline, tiny_loaded, force_answer, scene_image
):
    force_answer(tiny_loaded, TWO_SEG)
    first = pipeline.segment(scene_image, QUESTION)
    second = pipeline.segment(scene_image.copy(), QUESTION)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.timings["image_encoding"] < 0.05
    assert second.timings["image_encoding"] < first.timings["image_encoding"]
    for a, b in zip(first.masks, second.masks, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score
    other = scene_image.copy()
    other[0, 0] = 0
    assert pipeline.segment(other, QUESTION).cache_hit is False
    pipeline.clear_cache()
    assert pipeline.segment(scene_image, QUESTION).cache_hit is False


def test_cache_is_bounded_lru(tiny_loaded, scene_image):
    pipeline = LisaPipeline(tiny_loaded, cache_size=2, max_new_tokens=1)
    images = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (0, 100, 200)]
    for image in images:
        pipeline.segment(image, "what")
    assert pipeline.segment(images[2], "what").cache_hit  # the newest stays
    assert pipeline.segment(images[1], "what").cache_hit
    assert not pipeline.segment(images[0], "what").cache_hit  # the oldest was evicted
    assert len(pipeline._cache) == 2


def test_segment_batch_matches_single_calls(pipeline, tiny_loaded, force_answer, scene_image):
    answers = ["[SEG].", "Sure, it is [SEG] and the other [SEG].", "No."]
    queries = [QUESTION, "Which shape would roll down a hill?", "Is there a cat?"]
    singles = []
    for query, answer in zip(queries, answers, strict=True):
        force_answer(tiny_loaded, answer)
        singles.append(pipeline.segment(scene_image, query, keep_logits=True))
    force_answer(tiny_loaded, *answers)
    batch = pipeline.segment_batch(scene_image, queries, keep_logits=True)
    assert [r.answer for r in batch] == answers
    assert [len(r.masks) for r in batch] == [1, 2, 0]
    assert all(r.cache_hit for r in batch)
    for single, batched in zip(singles, batch, strict=True):
        assert single.answer == batched.answer
        for a, b in zip(single.masks, batched.masks, strict=True):
            # Left padding changes the float rounding of the batch, not the result.
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)
            clear = np.abs(a.logits) > 1e-2
            np.testing.assert_array_equal(a.mask[clear], b.mask[clear])
            assert a.score == pytest.approx(b.score, abs=1e-4)
    assert batch[2].message == NO_SEG_MESSAGE


def test_answer_without_seg_gives_no_masks_and_a_message(
    pipeline, tiny_loaded, force_answer, scene_image
):
    force_answer(tiny_loaded, "There is no cat in this picture.")
    result = pipeline.segment(scene_image, "Where is the cat?")
    assert result.answer == "There is no cat in this picture."
    assert result.masks == []
    assert result.message == NO_SEG_MESSAGE


def test_answer_cut_at_max_new_tokens_says_so(tiny_loaded, force_answer, scene_image):
    force_answer(tiny_loaded, "It is a very very very very long answer [SEG].")
    result = LisaPipeline(tiny_loaded, max_new_tokens=2).segment(scene_image, QUESTION)
    assert result.masks == []
    assert NO_SEG_MESSAGE in result.message and "cut off at 2" in result.message


def test_unforced_generation_runs_end_to_end(pipeline, scene_image):
    result = pipeline.segment(scene_image, QUESTION)
    assert isinstance(result.answer, str)
    assert len(result.masks) == result.answer.count("[SEG]")


@pytest.mark.parametrize("variant", ["bf16", "4bit", "lora", "4bit-lora"])
def test_reduced_precision_and_lora_models_segment_and_reuse_the_prefix(
    variant, force_answer, scene_image
):
    from lisa_demo.config import preset

    changes = {
        "bf16": {"precision": "bf16"},
        "4bit": {"quantization": "4bit"},
        "lora": {"use_lora": True},
        "4bit-lora": {"quantization": "4bit", "use_lora": True},
    }[variant]
    pipeline = LisaPipeline.from_config(
        preset("tiny-random").replace(**changes), device="cpu", max_new_tokens=8
    )
    force_answer(pipeline.loaded, "[SEG].")
    result = pipeline.segment(scene_image, QUESTION, keep_logits=True)
    assert len(result.masks) == 1
    assert result.masks[0].mask.shape == scene_image.shape[:2]
    assert result.masks[0].logits.dtype == np.float32
    assert np.isfinite(result.masks[0].logits).all() and np.isfinite(result.masks[0].score)
    again = pipeline.segment(scene_image, QUESTION, keep_logits=True)  # from the cached prefix
    assert again.cache_hit
    np.testing.assert_array_equal(again.masks[0].logits, result.masks[0].logits)


# The prompt-prefix KV cache -----------------------------------------------------------------
def test_prompt_prefix_ids_do_not_depend_on_the_question(image_first_loaded):
    """Tokenization splits around the special <image> token: BOS, "USER: " and the image
    tokens come out the same whatever follows."""
    from lisa_demo.config import IMAGE_TOKEN
    from lisa_demo.inputs import encode_text, image_token_count, prompt_template

    tokenizer = image_first_loaded.tokenizer
    n_image = image_token_count(image_first_loaded.processor)
    template = prompt_template(image_first_loaded.processor)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    questions = [QUESTION, "x", "\n  leading newline", "ünïcödé 日本", "<s> ASSISTANT: [SEG]"]
    prefixes = set()
    for question in questions:
        ids = encode_text(tokenizer, question, None, n_image, template)[0]
        last = max(i for i, t in enumerate(ids) if t == image_id)
        prefixes.add(tuple(ids[: last + 1]))
    assert len(prefixes) == 1
    (prefix,) = prefixes
    head = tokenizer("USER:", add_special_tokens=True).input_ids  # BOS + "USER:"
    assert list(prefix[: len(head)]) == head
    assert prefix[-n_image:] == (image_id,) * n_image
    assert image_id not in prefix[:-n_image]


def _language_model_lengths(loaded) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Records how many positions each forward of the language model processes."""
    lengths: list[int] = []
    llava = loaded.model.llava
    llava = llava.get_base_model() if hasattr(llava, "get_base_model") else llava

    def record(module, args, kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])

    handle = llava.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    return lengths, handle


@pytest.mark.parametrize("order", ["image_first", "question_first"])
def test_second_query_reuses_the_prefix_and_matches_the_uncached_path(
    order, tiny_loaded, image_first_loaded, force_answer, scene_image
):
    """First query, second query (encodings, and with the image first the prompt prefix, from
    the cache) and a pipeline with the cache disabled give the same answer, masks and scores.
    Image first, the second prefills only the question; question first, each query prefills
    all of its prompt but the last token (the image tokens depend on the question)."""
    loaded = image_first_loaded if order == "image_first" else tiny_loaded
    n_prompt = len(LisaPipeline(loaded)._prompt_ids([QUESTION])[0])
    lengths, handle = _language_model_lengths(loaded)
    try:
        for answer in (TWO_SEG, None):  # forced, then the random model's own answer
            if answer is not None:
                force_answer(loaded, answer)
            cached = LisaPipeline(loaded, max_new_tokens=12)
            lengths.clear()
            first = cached.segment(scene_image, QUESTION, keep_logits=True)
            first_lengths = list(lengths)
            lengths.clear()
            second = cached.segment(scene_image, QUESTION, keep_logits=True)
            second_lengths = list(lengths)
            disabled = LisaPipeline(loaded, cache_size=0, max_new_tokens=12)
            fresh = disabled.segment(scene_image, QUESTION, keep_logits=True)
            assert [r.cache_hit for r in (first, second, fresh)] == [False, True, False]
            assert first.answer == second.answer == fresh.answer
            if answer is not None:
                assert len(first.masks) == 2
            for other in (second, fresh):
                assert len(other.masks) == len(first.masks)
                for a, b in zip(first.masks, other.masks, strict=True):
                    assert np.array_equal(a.mask, b.mask)
                    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
                    np.testing.assert_allclose(a.score, b.score, rtol=0, atol=1e-5)
            entry = next(iter(cached._cache.values()))
            if order == "question_first":
                assert entry.prefix is None
                assert first_lengths[:2] == second_lengths[:2] == [n_prompt - 1, 1]
                assert all(n == 1 for n in first_lengths[1:] + second_lengths[1:])  # decoding
                assert len(second_lengths) == len(first_lengths)
                continue
            prefix = len(entry.prefix.ids)
            question = first_lengths[1]
            assert prefix + question == n_prompt
            assert first_lengths[:2] == [prefix, question]  # prefix, then the question part
            assert second_lengths[0] == question  # the prefix came from the cache
            assert all(n == 1 for n in first_lengths[2:] + second_lengths[1:])  # decoding
            assert len(second_lengths) == len(first_lengths) - 1
    finally:
        handle.remove()


@pytest.mark.parametrize("order", ["image_first", "question_first"])
def test_split_prefill_matches_one_generate_over_the_whole_prompt(
    order, tiny_loaded, image_first_loaded, force_answer, scene_image
):
    """The prefill-then-greedy generation (from the cached prefix when the image comes
    first) gives the tokens and [SEG] states of one plain generate call over the whole prompt
    (the path before the prefix cache)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from lisa_demo.inputs import collate_text

    loaded = image_first_loaded if order == "image_first" else tiny_loaded
    pipeline = LisaPipeline(loaded, max_new_tokens=12)
    force_answer(loaded, TWO_SEG)
    pipeline.segment(scene_image, QUESTION)  # fills the cache (and the prefix, image first)
    with torch.inference_mode():
        encoding, hit = pipeline._encode_image(scene_image)
        assert hit and (encoding.prefix is not None) == (order == "image_first")
        split = pipeline._generate(encoding, [QUESTION])[0]
        batch = collate_text(pipeline._prompt_ids([QUESTION]), None, 0)
        features = BaseModelOutputWithPooling(pooler_output=[encoding.image_features])
        out = pipeline._llava.generate(
            **batch, mm_encoder_outputs={"image": features}, do_sample=False,
            output_hidden_states=True, return_dict_in_generate=True, max_new_tokens=12,
            pad_token_id=0, eos_token_id=loaded.tokenizer.eos_token_id,
        )  # fmt: skip
    states = torch.stack([step[-1][0, -1] for step in out.hidden_states])
    tokens = out.sequences[0, batch["input_ids"].shape[1] :]
    seg = tokens[: len(states)] == loaded.seg_token_id
    assert split.text == TWO_SEG
    torch.testing.assert_close(split.seg_states, states[seg], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["image_first", "question_first"])
def test_batches_share_the_cached_prefix(
    order, tiny_loaded, image_first_loaded, force_answer, scene_image
):
    loaded = image_first_loaded if order == "image_first" else tiny_loaded
    answers = ["[SEG].", "Sure, it is [SEG] and the other [SEG].", "No."]
    queries = [QUESTION, "Which shape would roll down a hill? Tell me.", "Cat?"]
    force_answer(loaded, *answers)
    cached = LisaPipeline(loaded, max_new_tokens=12)
    cached.segment_batch(scene_image, queries)
    again = cached.segment_batch(scene_image, queries, keep_logits=True)
    fresh = LisaPipeline(loaded, cache_size=0, max_new_tokens=12).segment_batch(
        scene_image, queries, keep_logits=True
    )
    assert all(r.cache_hit for r in again)
    assert [r.answer for r in again] == [r.answer for r in fresh] == answers
    for a_result, b_result in zip(again, fresh, strict=True):
        for a, b in zip(a_result.masks, b_result.masks, strict=True):
            assert np.array_equal(a.mask, b.mask)
            np.testing.assert_allclose(a.score, b.score, rtol=0, atol=1e-5)


def test_prefix_caches_are_bounded_separately(image_first_loaded):
    pipeline = LisaPipeline(image_first_loaded, cache_size=3, prefix_cache_size=1, max_new_tokens=1)
    images = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (0, 100, 200)]
    for image in images:
        pipeline.segment(image, "what")
    assert [e.prefix is not None for e in pipeline._cache.values()] == [False, False, True]
    assert pipeline.segment(images[0], "again").cache_hit  # encodings kept, prefix rebuilt
    with_prefix = [key for key, e in pipeline._cache.items() if e.prefix is not None]
    assert with_prefix == [pipeline._cache_key(images[0])]  # now the most recent image
    none = LisaPipeline(image_first_loaded, prefix_cache_size=0, max_new_tokens=1)
    none.segment(images[0], "what")
    assert all(e.prefix is None for e in none._cache.values())
    with pytest.raises(ValueError, match="prefix_cache_size"):
        LisaPipeline(image_first_loaded, prefix_cache_size=-1)


# Queries ------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "   \n\t "])
def test_empty_query_is_an_input_error(pipeline, scene_image, query):
    with pytest.raises(InputError, match="empty"):
        pipeline.segment(scene_image, query)


def test_overlong_or_malformed_queries_are_input_errors(pipeline, scene_image):
    with pytest.raises(InputError, match="1000"):
        pipeline.segment(scene_image, "a" * 1001)
    with pytest.raises(InputError, match="<image>"):
        pipeline.segment(scene_image, "what is <image> here")
    with pytest.raises(InputError, match="threshold"):
        pipeline.segment(scene_image, QUESTION, threshold=float("nan"))
    with pytest.raises(InputError, match="list of queries"):
        pipeline.segment_batch(scene_image, [])
    # 900 characters fit the limit but not the tiny model's 512 positions.
    with pytest.raises(InputError, match="too long for this model"):
        pipeline.segment(scene_image, " ".join(["xq"] * 300))


# Images -------------------------------------------------------------------------------------
def test_missing_and_non_image_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(InputError, match="not an image"):
        load_image(text)


def test_corrupt_png_is_an_input_error(tmp_path, scene_image):
    data = png_bytes(scene_image)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged or truncated"):
        load_image(truncated)
    garbled = bytearray(data)
    garbled[60:80] = b"\x00" * 20  # inside the compressed pixel data
    with pytest.raises(InputError, match="damaged or truncated"):
        load_image(bytes(garbled))


@pytest.mark.parametrize("side", [10_000, 20_000])  # below and above PIL's own bomb error
def test_huge_image_header_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(side, side))
    with pytest.raises(InputError, match="megapixel"):
        load_image(path)


def test_size_limit_applies_to_arrays_too():
    with pytest.raises(InputError, match="megapixel"):
        load_image(np.broadcast_to(np.uint8(0), (1, MAX_IMAGE_PIXELS + 1, 3)))
    with pytest.raises(InputError, match="zero size"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))


def test_grayscale_rgba_palette_and_16bit_pngs_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(png_bytes(gray))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out == gray[:, :, None]).all()

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: mid gray
    path = tmp_path / "rgba.png"
    path.write_bytes(png_bytes(rgba))
    out = load_image(path)
    assert out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert abs(int(out[1, 0, 0]) - 127) <= 1
    np.testing.assert_array_equal(load_image(rgba), out)  # arrays composite the same way

    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0])
    assert load_image(palette).tolist() == [[[255, 0, 0], [0, 255, 0]]]

    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert load_image(deep)[0, :, 0].tolist() == [0, 255]


def test_load_image_does_not_modify_or_alias_its_input(scene_image):
    before = scene_image.copy()
    out = load_image(scene_image)
    out[:] = 0
    np.testing.assert_array_equal(scene_image, before)


def test_pipeline_accepts_paths_bytes_and_pil(pipeline, tmp_path, scene_image):
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(scene_image))
    first = pipeline.segment(path, QUESTION)
    assert pipeline.segment(str(path), QUESTION).cache_hit
    assert pipeline.segment(path.read_bytes(), QUESTION).cache_hit
    assert pipeline.segment(Image.open(path), QUESTION).cache_hit
    assert first.cache_hit is False
    with pytest.raises(InputError, match="unsupported image type"):
        pipeline.segment(12345, QUESTION)
