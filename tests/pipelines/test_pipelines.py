"""Task pipelines on a tiny random model: calling shapes, results, batching, settings, errors.

An untrained model answers nonsense, but greedily and so deterministically: enough to check that the
pipelines ask what the training data asks, batch without changing answers, and pass settings through.
"""
import ast
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fusion
import pipelines
from fusion.errors import CheckpointError
from pipelines import (CAPTION_PROMPT, VIDEO_QA_PROMPT, VQA_PROMPT, CaptioningPipeline, DefaultModelMissingError,
                       PipelineInputError, UnknownTaskError, VideoQAPipeline, VQAPipeline)
from tokenizer import FusionTokenizer
from vision import ImageLoadError, ImageTooLargeError, VideoLoadError, VisionEncoderConfig, sample_frames, write_video

ROOT = Path(__file__).resolve().parents[2]
COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
TEXTS = ([f"what color is the {s}? {c}" for c in COLORS for s in SHAPES]
         + [f"Describe the image. a {c} {s} at the top left" for c in COLORS for s in SHAPES]
         + [f"which way does the {c} {s} move? left, then right" for c in COLORS for s in SHAPES]) * 5
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "which way does the red square move?",
             "is there a star?", "what is at the top left of the image?"]


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    config = fusion.FusionConfig(
        decoder=fusion.DecoderConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     head_dim=16, intermediate_size=64, num_experts=4, attention_chunk_size=64,
                                     initializer_range=0.1),
        vision=VisionEncoderConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2))
    return fusion.FusionModel(config, tok).eval()


def image(seed, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(FusionTokenizer.train(TEXTS, vocab_size=300))


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    png = folder / "shape.png"
    Image.fromarray(image(7, (40, 56))).save(png)
    frames = np.stack([np.roll(image(100 + (t // 4), (32, 32)), 2 * t, axis=1) for t in range(16)])
    clip = folder / "clip.mp4"
    write_video(clip, frames, fps=8.0)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_video = folder / "broken.mp4"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 then nothing useful")
    return {"png": png, "clip": clip, "broken_png": broken, "broken_mp4": bad_video}


@pytest.fixture(scope="module")
def vqa(model):
    return pipelines.pipeline("vqa", model=model)


def user(text):
    return [{"role": "user", "content": text}]


def assert_same_results(a, b, tol=1e-4):
    """Same answers / texts, scores within `tol`, for results of one input or of a list."""
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, list):
            assert_same_results(x, y, tol)
            continue
        assert x.keys() == y.keys()
        for key in x:
            if key == "score":
                assert x[key] == pytest.approx(y[key], abs=tol)
            else:
                assert x[key] == y[key]


# -- results and calling shapes ------------------------------------------------------------------------
def test_vqa_asks_the_training_prompt_and_scores_with_the_mean_logprob(model, vqa):
    img, question = image(1), QUESTIONS[0]
    [result] = vqa(image=img, question=question)
    [chat] = model.chat([user(f"<image>\n{question}")], [[img]], max_new_tokens=16)
    assert result == {"answer": chat["text"], "score": pytest.approx(math.exp(chat["logprob"]), abs=1e-6)}
    assert isinstance(result["answer"], str) and isinstance(result["score"], float)
    assert 0.0 < result["score"] <= 1.0


def test_vqa_calling_shapes_agree(vqa):
    img, question = image(2), QUESTIONS[1]
    single = vqa(image=img, question=question)
    assert len(single) == 1 and set(single[0]) == {"answer", "score"}
    assert_same_results(vqa(img, question), single)
    assert_same_results(vqa({"image": img, "question": question}), single)
    listed = vqa([{"image": img, "question": question}])
    assert len(listed) == 1
    assert_same_results(listed[0], single)
    assert_same_results(vqa(({"image": img, "question": question},))[0], single)  # a tuple of records too
    assert vqa([]) == [] and vqa(()) == []


def test_image_given_as_path_pil_array_or_tensor_gives_the_same_answer(vqa, media):
    pixels = np.asarray(Image.open(media["png"]).convert("RGB"))
    as_path = vqa(image=str(media["png"]), question=QUESTIONS[0])
    assert_same_results(vqa(image=media["png"], question=QUESTIONS[0]), as_path)  # os.PathLike
    assert_same_results(vqa(image=Image.open(media["png"]), question=QUESTIONS[0]), as_path)
    assert_same_results(vqa(image=pixels, question=QUESTIONS[0]), as_path)
    assert_same_results(vqa(image=torch.from_numpy(pixels.copy()).permute(2, 0, 1), question=QUESTIONS[0]), as_path)


def test_list_fields_pair_every_image_with_every_question(vqa):
    a, b = image(3), image(4)
    q1, q2 = QUESTIONS[:2]
    one = {(i, q): vqa(image=im, question=q) for i, im in enumerate((a, b)) for q in (q1, q2)}
    per_image = vqa(image=[a, b], question=q1)
    assert_same_results(per_image, [one[0, q1], one[1, q1]])
    per_question = vqa(image=a, question=[q1, q2])
    assert_same_results(per_question, [one[0, q1], one[0, q2]])
    product = vqa(image=[a, b], question=[q1, q2])  # image-major, like transformers
    assert_same_results(product, [one[0, q1], one[0, q2], one[1, q1], one[1, q2]])


def test_batched_results_equal_unbatched(model):
    inputs = [{"image": image(10 + i, (24 + 8 * i, 48 - 4 * i)), "question": q} for i, q in enumerate(QUESTIONS)]
    one_by_one = pipelines.pipeline("vqa", model=model, batch_size=1)(inputs)
    assert len({r[0]["answer"] for r in one_by_one}) > 1, "the inputs should get different answers"
    assert_same_results(pipelines.pipeline("vqa", model=model, batch_size=3)(inputs), one_by_one)
    assert_same_results(pipelines.pipeline("vqa", model=model)(inputs, batch_size=5), one_by_one)

    captions = pipelines.pipeline("captioning", model=model)
    images = [x["image"] for x in inputs]
    assert_same_results(captions(images, batch_size=4), [captions(im) for im in images])


def test_captioning_shapes_and_prompt(model, media):
    captioning = pipelines.pipeline("captioning", model=model)
    img = image(5)
    result = captioning(img)
    [chat] = model.chat([user("<image>\nDescribe the image.")], [[img]], max_new_tokens=48)
    assert result == [{"generated_text": chat["text"]}]
    assert captioning(image=img) == result
    assert captioning({"image": img}) == result
    both = captioning([img, str(media["png"])])
    assert len(both) == 2 and both[0] == result and both[1] == captioning(str(media["png"]))
    assert captioning([{"image": img}]) == [result]


def test_video_qa_samples_frames_as_asked(model, media):
    video_qa = pipelines.pipeline("video-qa", model=model)
    clip, question = str(media["clip"]), QUESTIONS[2]

    def chat(**sampling):
        [out] = model.chat([user(f"<video>\n{question}")], videos=[[clip]], max_new_tokens=16, **sampling)
        return [{"answer": out["text"], "score": pytest.approx(math.exp(out["logprob"]), abs=1e-6)}]

    four = video_qa(video=clip, question=question, num_frames=4)
    assert four == chat(num_frames=4)
    assert video_qa(video=clip, question=question, fps=2) == chat(fps=2)
    assert video_qa(video=clip, question=question) == chat()  # the model's saved video settings
    assert four != video_qa(video=clip, question=question, num_frames=2)

    # construction-time settings, overridden at call time (a sampling mode replaces the other one)
    by_fps = pipelines.pipeline("video-qa", model=model, fps=2)
    assert by_fps(video=clip, question=question) == chat(fps=2)
    assert by_fps(video=clip, question=question, num_frames=4) == four
    assert_same_results(video_qa({"video": media["clip"], "question": question}, num_frames=4), four)
    # frames sampled beforehand pass through
    assert_same_results(video_qa(video=sample_frames(clip, num_frames=4), question=question), four)
    frames, seconds = sample_frames(clip, num_frames=4)
    assert_same_results(video_qa(video=(frames, seconds), question=question), four)
    for times in (torch.tensor(seconds), np.array(seconds)):  # the times as a reader may hand them over
        assert_same_results(video_qa(video=(frames, times), question=question), four)
    # sampling options cannot apply to frames already sampled: used as they are, with a warning saying so
    with pytest.warns(UserWarning, match=r"num_frames=2 ignored: the video was given as 4 frames already sampled"):
        assert_same_results(video_qa(video=(frames, seconds), question=question, num_frames=2), four)

    listed = video_qa([{"video": clip, "question": q} for q in QUESTIONS[:3]], num_frames=4, batch_size=3)
    assert_same_results(listed, [video_qa(video=clip, question=q, num_frames=4) for q in QUESTIONS[:3]])


def test_prompts_are_the_training_data_prompts(tmp_path):
    from fusion.data.shapes_world import ShapesWorldConfig, generate_split

    config = ShapesWorldConfig(val_images=1, val_videos=1)
    samples, _, _ = generate_split(str(tmp_path), "val", config)
    by_task = {}
    for sample in samples:
        by_task.setdefault(sample["task"], []).append(sample["conversations"][0]["content"])
    assert by_task["caption"] == [CAPTION_PROMPT] == ["<image>\nDescribe the image."]
    for task, template in (("vqa", VQA_PROMPT), ("video-qa", VIDEO_QA_PROMPT)):
        assert by_task[task]
        for content in by_task[task]:
            marker, question = content.split("\n", 1)
            assert template.format(question=question) == content and marker in ("<image>", "<video>")


def test_pipelines_answer_on_shapes_world_files(model, tmp_path):
    from fusion.data.shapes_world import ShapesWorldConfig, generate_split

    samples, _, _ = generate_split(str(tmp_path), "val", ShapesWorldConfig(val_images=1, val_videos=1))
    img = next(s for s in samples if s["task"] == "vqa")
    vid = next(s for s in samples if s["task"] == "video-qa")
    question = img["conversations"][0]["content"].split("\n", 1)[1]
    [answer] = pipelines.pipeline("vqa", model=model)(image=tmp_path / img["images"][0], question=question)
    assert isinstance(answer["answer"], str) and 0 < answer["score"] <= 1
    question = vid["conversations"][0]["content"].split("\n", 1)[1]
    [answer] = pipelines.pipeline("video-qa", model=model)(video=tmp_path / vid["videos"][0], question=question)
    assert isinstance(answer["answer"], str) and 0 < answer["score"] <= 1


# -- the factory -----------------------------------------------------------------------------------------
def test_fusion_pipeline_goes_through_the_lazy_import_and_aliases_work(model):
    for names, cls in ((("captioning", "image-to-text"), CaptioningPipeline),
                       (("vqa", "visual-question-answering", "VQA"), VQAPipeline),
                       (("video-qa", "video-question-answering", "video_qa"), VideoQAPipeline)):
        for name in names:
            pipe = fusion.pipeline(name, model=model, batch_size=2, max_new_tokens=3)
            assert type(pipe) is cls and pipe.task == names[0] and pipe.batch_size == 2 and pipe.model is model
    assert_same_results(fusion.pipeline("vqa", model=model)(image=image(1), question=QUESTIONS[0]),
                        pipelines.pipeline("vqa", model=model)(image=image(1), question=QUESTIONS[0]))


def test_nothing_below_pipelines_imports_it_at_module_level():
    offenders = []
    for package in ("fusion", "vision", "tokenizer"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:  # module level only: fusion.pipeline imports lazily
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "pipelines"]
    assert offenders == []


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(UnknownTaskError) as info:
        pipelines.pipeline("vqaa")
    message = str(info.value)
    for name in ("captioning", "image-to-text", "vqa", "visual-question-answering", "video-qa",
                 "video-question-answering"):
        assert repr(name) in message
    assert "did you mean 'vqa'" in message and isinstance(info.value, ValueError)
    with pytest.raises(UnknownTaskError, match="valid tasks"):
        fusion.pipeline("summarization")
    with pytest.raises(UnknownTaskError, match="must be a str"):
        fusion.pipeline(None)


# -- model, device, dtype --------------------------------------------------------------------------------
def test_model_from_a_folder_path_answers_as_the_model(model, model_dir, vqa):
    expected = vqa(image=image(1), question=QUESTIONS[0])
    for path in (str(model_dir), model_dir):
        pipe = pipelines.pipeline("vqa", model=path)
        assert isinstance(pipe.model, fusion.FusionModel) and pipe.model is not model
        assert_same_results(pipe(image=image(1), question=QUESTIONS[0]), expected)


def test_missing_or_broken_model_folder_is_named(model_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no-such-model"):
        pipelines.pipeline("vqa", model=missing)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="broken-model"):
        pipelines.pipeline("captioning", model=str(broken))
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="broken-model"):
        fusion.pipeline("video-qa", model=broken)
    with pytest.raises(PipelineInputError, match="model must be a checkpoint folder"):
        pipelines.pipeline("vqa", model=3)


def test_missing_default_model_says_how_to_pass_one(monkeypatch, tmp_path):
    monkeypatch.setattr("pipelines.loading.default_model_location", lambda: tmp_path / "default_model")
    with pytest.raises(DefaultModelMissingError) as info:
        fusion.pipeline("vqa")
    assert isinstance(info.value, CheckpointError)
    message = str(info.value)
    assert "default model is missing" in message and "model=" in message and str(tmp_path) in message


def test_default_model_is_used_as_soon_as_the_folder_exists(monkeypatch, model_dir, vqa):
    monkeypatch.setattr("pipelines.loading.default_model_location", lambda: model_dir)
    for pipe in (pipelines.pipeline("vqa"), pipelines.pipeline("vqa", model="default")):  # as a config names it
        assert_same_results(pipe(image=image(1), question=QUESTIONS[0]), vqa(image=image(1), question=QUESTIONS[0]))


def test_default_model_location_is_inside_the_fusion_package():
    location = Path(str(pipelines.default_model_location()))
    assert location == Path(fusion.__file__).parent / "default_model"
    if location.is_dir():
        return
    with pytest.raises(DefaultModelMissingError, match="default model is missing"):
        fusion.pipeline("captioning")


def test_shipped_default_model_answers():
    if not Path(str(pipelines.default_model_location())).is_dir():
        pytest.skip("fusion/default_model/ is not in this install yet (it is trained and committed later)")
    vqa = fusion.pipeline("vqa")
    [result] = vqa(image=image(1), question="what color is the circle?")
    assert isinstance(result["answer"], str) and 0 < result["score"] <= 1
    [caption] = fusion.pipeline("captioning")(image(1))
    assert isinstance(caption["generated_text"], str)


@pytest.mark.parametrize("device", [-1, "cpu", torch.device("cpu"), " cpu "])
def test_device_forms(model, device):
    pipe = pipelines.pipeline("vqa", model=model, device=device)
    assert pipe.device == torch.device("cpu") and next(pipe.model.parameters()).device.type == "cpu"


def test_bad_devices_are_refused(model):
    for device, match in ((-2, "use -1 for the CPU"), ("gpu0", "not a device name"), (True, "pass an int"),
                          (1.5, "must be an int"), ([0], "must be an int")):
        with pytest.raises(PipelineInputError, match=match):
            pipelines.pipeline("vqa", model=model, device=device)
    if not torch.cuda.is_available():
        for device in (0, "cuda:0", torch.device("cuda", 1)):
            with pytest.raises(PipelineInputError, match="no CUDA|sees none"):
                pipelines.pipeline("vqa", model=model, device=device)


def test_dtype_forms(model, model_dir):
    for dtype in ("float32", torch.float32, "torch.float32", "fp32"):
        assert pipelines.pipeline("vqa", model=model, dtype=dtype).dtype == torch.float32
    pipe = pipelines.pipeline("vqa", model=model_dir, dtype="bfloat16")
    assert pipe.dtype == torch.bfloat16 and {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    [result] = pipe(image=image(1), question=QUESTIONS[0], max_new_tokens=4)  # a bf16 tower takes the pixels
    assert isinstance(result["answer"], str) and 0 < result["score"] <= 1
    copy = fusion.FusionModel.from_pretrained(model_dir)
    assert pipelines.pipeline("captioning", model=copy, dtype=torch.bfloat16).model is copy  # moved in place
    assert copy.decoder.embed_tokens.weight.dtype == torch.bfloat16
    for dtype, match in (("int8", "not a dtype name"), (torch.int64, "not a floating point"), (3, "must be a torch")):
        with pytest.raises(PipelineInputError, match=match):
            pipelines.pipeline("vqa", model=model, dtype=dtype)


# -- generation settings ---------------------------------------------------------------------------------
def spy_on_tokens(pipe, monkeypatch) -> list:
    """Record the generated token ids of every input the pipeline runs."""
    seen, forward = [], pipe.forward

    def recording(prepared, **generation):
        outputs = forward(prepared, **generation)
        seen.extend(out["tokens"] for out in outputs)
        return outputs

    monkeypatch.setattr(pipe, "forward", recording)
    return seen


def test_max_new_tokens_at_construction_and_call_time(model, monkeypatch):
    pipe = pipelines.pipeline("vqa", model=model, max_new_tokens=5, generate_kwargs={"stop_ids": []})
    tokens = spy_on_tokens(pipe, monkeypatch)
    img, question = image(1), QUESTIONS[0]
    pipe(image=img, question=question)
    pipe(image=img, question=question, max_new_tokens=3)  # the call wins
    pipe(image=img, question=question, generate_kwargs={"max_new_tokens": 4})
    pipe(image=img, question=question, max_new_tokens=2, generate_kwargs={"max_new_tokens": 4})
    pipe([{"image": img, "question": question}] * 2, max_new_tokens=6, batch_size=2)
    assert [len(t) for t in tokens] == [5, 3, 4, 2, 6, 6]
    assert tokens[1] == tokens[0][:3] and tokens[3] == tokens[0][:2]  # greedy: shorter runs are prefixes
    assert pipe.generation["max_new_tokens"] == 5  # a call changes nothing for the next one

    default = pipelines.pipeline("captioning", model=model, generate_kwargs={"stop_ids": []})
    tokens = spy_on_tokens(default, monkeypatch)
    default(img)
    assert len(tokens[0]) == CaptioningPipeline.default_max_new_tokens


def test_generate_kwargs_pass_through(model):
    img, question = image(1), QUESTIONS[0]
    greedy = pipelines.pipeline("vqa", model=model)(image=img, question=question)
    top1 = pipelines.pipeline("vqa", model=model, generate_kwargs={"do_sample": True, "top_k": 1})
    assert_same_results(top1(image=img, question=question, generate_kwargs={"generator": torch.Generator().manual_seed(0)}),
                        greedy)

    def sampled(seed, pipe=pipelines.pipeline("vqa", model=model, generate_kwargs={"do_sample": True, "top_k": 1})):
        # call-time generate_kwargs update the construction ones: top_k=None lifts the top-1 cut
        options = {"top_k": None, "temperature": 3.0, "generator": torch.Generator().manual_seed(seed)}
        return pipe(image=img, question=question, generate_kwargs=options)

    assert_same_results(sampled(1), sampled(1))  # seeded sampling is repeatable
    assert sampled(1)[0]["answer"] != greedy[0]["answer"]  # and it did sample


# -- bad inputs -----------------------------------------------------------------------------------------
def test_missing_and_unknown_keys(vqa):
    img = image(1)
    with pytest.raises(PipelineInputError, match="missing 'question'"):
        vqa(image=img)
    with pytest.raises(PipelineInputError, match="missing key.* 'question'"):
        vqa({"image": img})
    with pytest.raises(PipelineInputError, match=r"input 1: .*missing key.* 'image'"):
        vqa([{"image": img, "question": "q?"}, {"question": "q?"}])
    with pytest.raises(PipelineInputError, match="unknown key.* 'questoin'"):
        vqa({"image": img, "questoin": "q?"})
    with pytest.raises(PipelineInputError, match="no input given"):
        vqa()
    with pytest.raises(PipelineInputError, match="not both"):
        vqa({"image": img, "question": "q?"}, question="q?")
    with pytest.raises(TypeError, match="at most 2 positional"):
        vqa(img, "q?", "extra")
    with pytest.raises(TypeError, match="both as a positional input and as a keyword"):
        vqa(img, "q?", question="q?")
    with pytest.raises(TypeError, match="unexpected argument.* 'num_frames'"):
        vqa(image=img, question="q?", num_frames=4)
    with pytest.raises(TypeError, match=r"unexpected argument.* 'video'.*use fusion.pipeline\('video-qa'\)"):
        vqa(video="clip.mp4", question="q?")
    with pytest.raises(TypeError, match="unexpected argument.* 'top_k'"):
        pipelines.pipeline("vqa", model=vqa.model, top_k=3)
    with pytest.raises(TypeError, match="unsupported option.* 'beams'"):
        vqa(image=img, question="q?", generate_kwargs={"beams": 2})


def test_bad_questions(vqa):
    img = image(1)
    record = {"image": img, "question": "  what color?  "}
    vqa(record)
    assert record["question"] == "  what color?  "  # the caller's dict is left alone
    for question, match in ((3, "must be a str"), ("   ", "is empty")):
        with pytest.raises(PipelineInputError, match=match):
            vqa(image=img, question=question)


def test_a_question_that_mentions_a_marker_asks_about_the_text(vqa, monkeypatch):
    """"what does the <image> tag do?" is a question about HTML: the pipeline places the image itself and
    the question's "<image>" reaches the model as text (it used to be refused)."""
    seen = []
    chat = vqa.model.chat
    monkeypatch.setattr(vqa.model, "chat", lambda conversations, *args, **kwargs: (
        seen.extend(conversations), chat(conversations, *args, **kwargs))[1])
    for question in ("what does the <image> tag do?", "and <video>, \\<image>?"):
        assert len(vqa(image=image(1), question=question)) == 1
        sample = vqa.model.processor(seen[-1], [image(1)], add_generation_prompt=True)
        assert sample.input_ids.tolist().count(vqa.model.tokenizer.image_start_id) == 1  # the pipeline's image only
        assert question in vqa.model.tokenizer.decode(sample.input_ids.tolist())


def test_bad_images_raise_the_vision_errors(vqa, media, tmp_path):
    with pytest.raises(ImageLoadError, match="cannot load an image from a int"):
        vqa(image=3, question="q?")
    with pytest.raises(ImageLoadError, match="nothing-here.png"):
        vqa(image=str(tmp_path / "nothing-here.png"), question="q?")
    with pytest.raises(ImageLoadError, match="broken.png"):
        pipelines.pipeline("captioning", model=vqa.model)(str(media["broken_png"]))
    with pytest.raises(ImageLoadError) as info:
        vqa([{"image": image(1), "question": "q?"}, {"image": str(media["broken_png"]), "question": "q?"}])
    if sys.version_info >= (3, 11):
        assert any("input 1 of the 2" in note for note in info.value.__notes__)
    # the model's own pixel limit, as chat and training apply it (the pipelines used the library default)
    limited = pipelines.pipeline("vqa", model=vqa.model)
    saved, vqa.model.processor.image_processor.max_pixels = vqa.model.processor.image_processor.max_pixels, 100
    try:
        with pytest.raises(ImageTooLargeError, match="shape.png"):
            limited(image=str(media["png"]), question="q?")
        with pytest.raises(ImageTooLargeError, match="shape.png"):
            pipelines.pipeline("captioning", model=vqa.model)(str(media["png"]))
    finally:
        vqa.model.processor.image_processor.max_pixels = saved


def test_bad_videos_raise_the_vision_errors(model, media, tmp_path):
    video_qa = pipelines.pipeline("video-qa", model=model)
    with pytest.raises(VideoLoadError, match="missing.mp4"):
        video_qa(video=str(tmp_path / "missing.mp4"), question="q?")
    with pytest.raises(VideoLoadError, match="broken.mp4"):
        video_qa(video=media["broken_mp4"], question="q?")
    with pytest.raises(VideoLoadError, match="cannot read a video from a int"):
        video_qa(video=3, question="q?")
    with pytest.raises(VideoLoadError, match="one timestamp per frame"):
        video_qa(video=(np.zeros((2, 32, 32, 3), np.uint8), [0.0]), question="q?")
    # the same checks where the processor is called directly (model.chat), not a PlaceholderMismatchError later
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(VideoLoadError, match=r"one timestamp per frame .* got 3 frame\(s\) and 2 timestamp"):
        model.chat([user("<video>\nq?")], videos=[[(frames, [0.0, 1.0])]], max_new_tokens=1)
    with pytest.raises(VideoLoadError, match="cannot read a video from a list"):
        model.chat([user("<video>\nq?")], videos=[[[frames, [0.0, 1.0, 2.0]]]], max_new_tokens=1)
    with pytest.raises(VideoLoadError, match="num_frames must be an integer >= 1, got 0"):  # not the default
        model.chat([user("<video>\nq?")], videos=[[str(media["clip"])]], num_frames=0, max_new_tokens=1)
    with pytest.raises(PipelineInputError, match="missing 'question'"):
        video_qa(video=str(media["clip"]))


def test_bad_settings(model):
    clip_settings = (({"num_frames": 0}, "num_frames must be at least 1"), ({"fps": -1}, "fps must be a positive"),
                     ({"fps": "2"}, "fps must be a positive"), ({"num_frames": 4, "fps": 2}, "not both"),
                     ({"max_frames": 2.5}, "max_frames must be a positive int"))
    video_qa = pipelines.pipeline("video-qa", model=model)
    for settings, match in clip_settings:
        with pytest.raises(PipelineInputError, match=match):
            pipelines.pipeline("video-qa", model=model, **settings)
        with pytest.raises(PipelineInputError, match=match):
            video_qa(video="clip.mp4", question="q?", **settings)
    for settings, match in (({"batch_size": 0}, "batch_size must be at least 1"),
                            ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
                            ({"max_new_tokens": "8"}, "max_new_tokens must be a positive int"),
                            ({"generate_kwargs": [("top_k", 1)]}, "generate_kwargs must be a dict")):
        with pytest.raises(PipelineInputError, match=match):
            pipelines.pipeline("vqa", model=model, **settings)


def test_chat_reads_the_media_that_typed_parts_carry(model, media):
    """Hugging Face-style parts that carry their file (or a PIL image) need no images=/videos= lists."""
    question = "What color is it?"
    [marked] = model.chat([user(f"<image>\n{question}")], images=[[str(media["png"])]], max_new_tokens=4)
    parts = [{"role": "user", "content": [{"type": "image", "image": str(media["png"])},
                                          {"type": "text", "text": f"\n{question}"}]}]
    for carried in (str(media["png"]), Image.open(media["png"])):
        parts[0]["content"][0] = {"type": "image", "image": carried}
        [answer] = model.chat([parts], max_new_tokens=4)
        assert answer["text"] == marked["text"] and answer["logprob"] == pytest.approx(marked["logprob"], abs=1e-6)
    video_parts = [{"role": "user", "content": [{"type": "video", "path": str(media["clip"])},
                                                {"type": "text", "text": f"\n{question}"}]}]
    [by_list] = model.chat([user(f"<video>\n{question}")], videos=[[str(media["clip"])]], max_new_tokens=4)
    [by_part] = model.chat([video_parts], max_new_tokens=4)
    assert by_part["text"] == by_list["text"]
    # a part without its file still needs the list
    with pytest.raises(Exception, match="1 <image> marker"):
        model.chat([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]])


# -- a model the caller is training ---------------------------------------------------------------------
def test_a_training_model_answers_in_eval_mode_and_keeps_its_modes(model):
    """A pipeline on a model that is training (to look at answers between steps) must neither switch the
    model to eval mode for good nor run it in train mode, where the MoE layers count the routed tokens
    into the load-balancing statistics the next expert-bias update uses."""
    expected = pipelines.pipeline("vqa", model=model)(image=image(1), question=QUESTIONS[0])
    moes = model.decoder.moe_layers()
    model.train()
    try:
        pipe = pipelines.pipeline("vqa", model=model)
        assert all(m.training for m in model.modules())  # construction leaves the model's mode alone
        counts = [moe.tokens_per_expert.clone() for moe in moes]
        seen, chat = [], model.chat
        model.chat = lambda *args, **kwargs: seen.append([m.training for m in model.modules()]) or chat(*args, **kwargs)
        try:
            assert_same_results(pipe(image=image(1), question=QUESTIONS[0]), expected)
        finally:
            del model.chat
        assert seen and not any(any(modes) for modes in seen)  # answered in eval mode
        assert all(m.training for m in model.modules())
        assert all(torch.equal(moe.tokens_per_expert, c) for moe, c in zip(moes, counts))
        with pytest.raises(ImageLoadError):  # a call that fails gives the modes back too
            pipe(image="no-such-image.png", question=QUESTIONS[0])
        assert all(m.training for m in model.modules())
        model.eval()
        model.adapter.train()  # a mix of modes comes back as it was, too
        pipe(image=image(1), question=QUESTIONS[0])
        assert [m.training for m in model.modules()] == [m in set(model.adapter.modules()) for m in model.modules()]
    finally:
        model.eval()


def test_an_image_given_as_the_model_says_where_it_goes(media):
    """`fusion.pipeline("captioning", "cat.png")` (or an image array) in the model's place: the error says the
    image goes to the call, not that an existing file does not exist (or numpy's "truth value ... ambiguous")."""
    for path in (str(media["png"]), media["png"]):
        with pytest.raises(CheckpointError, match=r"shape.png' is a file, not a model folder.*pipe\("):
            pipelines.pipeline("captioning", path)
    with pytest.raises(PipelineInputError, match=r"model must be .* got a ndarray.*pipe\("):
        pipelines.pipeline("vqa", image(1))


def test_max_frames_with_uniform_sampling_warns_that_it_is_ignored(model, media):
    """max_frames caps fps sampling only; given where the frames are sampled uniformly it changed nothing,
    silently (a user asking for at most 2 frames got the model's 8)."""
    video_qa = pipelines.pipeline("video-qa", model=model)
    clip, question = str(media["clip"]), QUESTIONS[2]
    uniform = video_qa(video=clip, question=question, num_frames=4)
    with pytest.warns(UserWarning, match=r"max_frames=2 ignored: it caps fps sampling.*uniformly \(4 frames\)"):
        assert_same_results(video_qa(video=clip, question=question, num_frames=4, max_frames=2), uniform)
    with pytest.warns(UserWarning, match=r"max_frames=2 ignored"):  # the model's own setting is uniform too
        pipelines.pipeline("video-qa", model=model, max_frames=2)(video=clip, question=question)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where it applies, no warning
        video_qa(video=clip, question=question, fps=8, max_frames=2)
    with pytest.warns(UserWarning) as caught:  # frames sampled already: the one warning that says so
        video_qa(video=sample_frames(clip, num_frames=3), question=question, max_frames=2)
    assert [str(w.message)[:61] for w in caught] == ["max_frames=2 ignored: the video was given as 3 frames already"]
