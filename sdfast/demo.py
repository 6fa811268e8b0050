"""The README's main job (`make demo`): a grid of prompts from the built-in model, then the
evaluator's prompt-adherence figures on held-out prompts."""
import argparse
import os
import sys
import tempfile
import time

from PIL import Image

PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small yellow square in the center on a black background",
    "a large blue triangle at the bottom right on a white background",
    "a small green circle at the top right on a purple background",
    "a large white square at the middle left on a red background",
    "a small orange triangle at the bottom center on a green background",
    "a large purple circle at the bottom left on a yellow background",
    "a small black square at the top center on an orange background",
    "a large green triangle at the middle right on a blue background",
]


def grid(images, cols):
    width, height = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * width, (i // cols) * height))
    return sheet


def _model_path():
    from .builtin import MODEL_PATH, init_checkpoint

    if MODEL_PATH.exists():
        return str(MODEL_PATH), True
    path = os.path.join(tempfile.gettempdir(), "sdfast-random-stand-in.safetensors")
    if not os.path.exists(path):
        init_checkpoint(path)
    return path, False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sdfast.demo")
    parser.add_argument("-o", "--output", default="out/demo-grid.png")
    parser.add_argument("--eval-n", type=int, default=100, help="held-out prompts to evaluate")
    args = parser.parse_args(argv)

    import sdfast
    from .builtin import RESOLUTION
    from .io.png import free_paths

    path, trained = _model_path()
    if not trained:
        print("note: the built-in model is not trained yet; using a random-weight stand-in of "
              "its architecture (images will be noise)")
    start = time.perf_counter()
    pipe = sdfast.load(path)
    images = [pipe.generate(p, width=RESOLUTION, height=RESOLUTION, steps=20, cfg=5.0,
                            seed=i, progress=False)[0] for i, p in enumerate(PROMPTS)]
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    out = free_paths(args.output, 1)[0]
    grid([im.resize((128, 128), Image.NEAREST) for im in images], cols=3).save(out)
    print(f"{len(PROMPTS)} images in {time.perf_counter() - start:.1f} s -> {out}")
    for i, prompt in enumerate(PROMPTS):
        print(f"  [{i // 3}, {i % 3}] {prompt}")
    if trained and args.eval_n > 0:
        from .eval.shapes_eval import evaluate, format_table

        print(format_table(evaluate(pipe, n=args.eval_n, seed=0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
