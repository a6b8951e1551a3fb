"""`make demo`: the default model on the sample media — captioning, visual QA and video QA.

    python examples/demo.py                      # the default model in fusion/default_model/
    python examples/demo.py --model runs/shapes-tiny/final
    python examples/demo.py --device cuda
    python examples/demo.py --threads 1          # a tiny model on a busy CPU runs fastest on one thread

For every call it prints the input file, the question, the model's answer, its score (the geometric
mean of the answer's token probabilities, see `pipelines.tasks`), the true answer from
examples/media/media.json and the time the call took. Exit status: 0 when everything ran (whatever
the answers), 1 when the model or the media folder's media.json cannot be loaded (the message says why
and what to pass), 2 for options argparse refuses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import fusion  # noqa: E402
from fusion.errors import CheckpointError  # noqa: E402
from pipelines.errors import PipelineInputError  # noqa: E402
from fusion.evaluation.metrics import answer_is_correct  # noqa: E402

WIDTH = 100


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number (1 or more)")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the fusion pipelines on the sample media.")
    parser.add_argument("--model", default=None,
                        help="a model folder (save_pretrained / fusion train); default: the shipped default model")
    parser.add_argument("--media", default=str(HERE / "media"), help="folder with media.json (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--num-frames", type=positive_int, default=None, help="frames sampled per video (default: the model's)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def read_manifest(media: Path) -> dict:
    """The media folder's media.json; ValueError naming the folder when it has none or it does not read."""
    path = media / "media.json"
    example = HERE / "media" / "media.json"
    if not path.is_file():
        raise ValueError(f"--media {str(media)!r} has no media.json (the files to run and their true answers; "
                         f"see {example} for the format)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        items = [(item, ("file", "caption", "questions")) for item in manifest["images"]] + \
            [(item, ("file", "description", "questions")) for item in manifest["videos"]]
        for item, keys in items:  # every key the demo reads (a KeyError names the one missing), before any work
            for key in keys:
                item[key]
            for question in item["questions"]:
                question["question"], question["answer"]
        files = [item["file"] for item, _ in items]
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err})") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a media manifest ({type(err).__name__}: {err}); see {example} for the "
                         f"format") from err
    missing = [name for name in files if not (media / name).is_file()]
    if missing:
        raise ValueError(f"{path} names files that are not in {str(media)!r}: {', '.join(missing)}")
    return manifest


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - start) * 1000


def verdict(answer: str, truth: str) -> str:
    return "correct" if answer_is_correct(answer, [truth]) else "WRONG"


def main(argv=None) -> int:
    args = parse_args(argv)
    media = Path(args.media)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        manifest = read_manifest(media)
    except ValueError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1

    try:
        (captioner, load_ms) = timed(lambda: fusion.pipeline("captioning", model=args.model, device=args.device))
    except CheckpointError as err:  # DefaultModelMissingError is one
        print(f"demo: cannot load the model: {err}", file=sys.stderr)
        return 1
    except PipelineInputError as err:  # e.g. --device cuda where torch sees no GPU
        print(f"demo: {err}", file=sys.stderr)
        return 1
    model = captioner.model  # one load, shared by the three pipelines
    vqa = fusion.pipeline("vqa", model=model)
    video_qa = fusion.pipeline("video-qa", model=model)
    params = sum(p.numel() for p in model.parameters())
    which = args.model or "the default model (fusion/default_model)"
    print(f"fusion demo: {which}, {params / 1e6:.1f} M parameters, {captioner.device}, {captioner.dtype}; "
          f"loaded in {load_ms:.0f} ms")
    print(f"media: {media}")

    right = total = 0

    def report(question: str, answer: str, score: float | None, truth: str, ms: float) -> None:
        nonlocal right, total
        total += 1
        right += answer_is_correct(answer, [truth])
        shown_score = "" if score is None else f"score {score:.2f}"
        print(f"    Q: {question}")
        print(f"    A: {answer!r:<36} {shown_score:<11} true: {truth!r} ({verdict(answer, truth)})  {ms:7.1f} ms")

    print("\n" + "=" * WIDTH + "\ncaptioning\n" + "=" * WIDTH)
    for item in manifest["images"]:
        [result], ms = timed(lambda: captioner(str(media / item["file"])))
        caption = result["generated_text"]
        print(f"  {item['file']}")
        print(f"    caption: {caption!r}  {ms:7.1f} ms")
        print(f"    true:    {item['caption']!r} ({'exact' if caption.strip() == item['caption'] else 'differs'})")

    print("\n" + "=" * WIDTH + "\nvisual question answering\n" + "=" * WIDTH)
    for item in manifest["images"]:
        print(f"  {item['file']}")
        for q in item["questions"]:
            [result], ms = timed(lambda: vqa(image=str(media / item["file"]), question=q["question"]))
            report(q["question"], result["answer"], result["score"], q["answer"], ms)

    print("\n" + "=" * WIDTH + "\nvideo question answering\n" + "=" * WIDTH)
    for item in manifest["videos"]:
        print(f"  {item['file']} ({item['description']})")
        for q in item["questions"]:
            [result], ms = timed(lambda: video_qa(video=str(media / item["file"]), question=q["question"],
                                                  num_frames=args.num_frames))
            report(q["question"], result["answer"], result["score"], q["answer"], ms)

    print("\n" + "=" * WIDTH)
    print(f"{right} of {total} questions answered correctly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
