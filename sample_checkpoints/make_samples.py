"""Regenerate the sample runs (needs scikit-learn: ``pip install -e '.[samples]'``).

    python sample_checkpoints/make_samples.py [OUT_DIR]

Trains the MLP of ``digits_mlp.py`` on scikit-learn's bundled digits data (no
download) twice, saving one ``.safetensors`` per epoch with the global step,
epoch and learning rate in its metadata:

* ``high_lr/``: SGD with momentum and no weight decay, on a schedule that raises
  the learning rate 8x after epoch 8 (to 0.8, far too high): late in training
  the weights jump and grow out of range (abs max 1.4 -> 6.3) while test accuracy
  dips and recovers.
* ``wgan_clip/``: RMSprop with every weight clipped to +-0.01 after each step,
  as a WGAN critic is trained: an audit finds every weight inside the range
  (test accuracy about 96%).

``digits_test.safetensors`` holds the held-out split (``x`` float32 [N, 64],
``y`` int64 [N]). Everything is deterministic: same bytes on every run.

With transformers installed (``pip install -e '.[hf]'``), also a tiny language-model run:

* ``tiny_lm/``: a GPT-2 (2 layers, width 32, tied embeddings, vocabulary of 122 words)
  trained by transformers' ``Trainer`` for 36 steps on synthetic sentences of words
  ``w0..w119`` (each word mostly decides the next), ``checkpoint-12/``, ``-24/``, ``-36/``
  as the Trainer writes them (``training_args.bin``, a pickle, removed), and the
  word-level tokenizer saved in the run folder (``save_pretrained``);
* ``tiny_lm_heldout.safetensors`` (``input_ids``/``labels`` int64 [16, 15]) and the
  same 16 sentences as text, ``tiny_lm_heldout.jsonl`` (``{"text": ...}`` per line).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_mlp import make_model  # noqa: E402

EPOCHS = 12
BATCH = 32
SEED = 0


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def train(out: Path, x: torch.Tensor, y: torch.Tensor, *, clip: float | None) -> None:
    torch.manual_seed(SEED)
    model = make_model()
    if clip is None:
        lr = 0.1
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    else:
        lr = 5e-4
        opt = torch.optim.RMSprop(model.parameters(), lr=lr)
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-clip, clip)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    step = 0
    for epoch in range(1, EPOCHS + 1):
        if clip is None and epoch > 8:  # the "bad schedule": the rate goes up late in training
            for group in opt.param_groups:
                group["lr"] = lr * 8
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if clip is not None:
                with torch.no_grad():
                    for p in model.parameters():
                        p.clamp_(-clip, clip)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        meta = {"step": str(step), "epoch": str(epoch), "lr": repr(opt.param_groups[0]["lr"]),
                "run": out.name, "model": "digits_mlp.py:make_model"}
        save_file(state, str(out / f"epoch_{epoch:02d}.safetensors"), metadata=meta)


LM_WORDS, LM_LENGTH = 120, 15


def lm_sentences(n: int, seed: int) -> list[str]:
    """``n`` sentences of words ``w0..w119``: each word is ``(7 * previous + 3) % 120``, or random 20% of the time."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = int(torch.randint(0, LM_WORDS, (1,), generator=g))
        words = []
        for _ in range(LM_LENGTH):
            words.append(f"w{w}")
            noisy = float(torch.rand(1, generator=g)) < 0.2
            w = int(torch.randint(0, LM_WORDS, (1,), generator=g)) if noisy else (w * 7 + 3) % LM_WORDS
        out.append(" ".join(words))
    return out


def make_lm(root: Path) -> None:
    """The tiny GPT-2 run ``tiny_lm/`` and its held-out sentences (needs transformers and tokenizers)."""
    import json
    import warnings

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments, set_seed

    run = root / "tiny_lm"
    table = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(LM_WORDS)}}
    core = Tokenizer(WordLevel(table, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(str(run))
    train = torch.tensor(tokenizer(lm_sentences(96, seed=0))["input_ids"])
    held_texts = lm_sentences(16, seed=1)
    held = torch.tensor(tokenizer(held_texts)["input_ids"])
    save_file({"input_ids": held, "labels": held.clone()}, str(root / "tiny_lm_heldout.safetensors"),
              metadata={"source": "make_samples.py lm_sentences(16, seed=1)", "tokenizer": "tiny_lm/"})
    (root / "tiny_lm_heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held_texts),
                                                encoding="utf-8")
    set_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(table), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=1))
    args = TrainingArguments(output_dir=str(run), max_steps=36, save_strategy="steps", save_steps=12,
                             per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", seed=SEED, save_only_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r.clone()} for r in train]).train()
    for leftover in run.glob("checkpoint-*/training_args.bin"):  # a pickle of the arguments: not shipped
        leftover.unlink()


def main(root: Path) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    root.mkdir(parents=True, exist_ok=True)
    save_file({"x": x_te.contiguous(), "y": y_te.contiguous()}, str(root / "digits_test.safetensors"),
              metadata={"source": "sklearn.datasets.load_digits", "split": "test 20% stratified, seed 0",
                        "inputs": "pixels / 16"})
    train(root / "high_lr", x_tr, y_tr, clip=None)
    train(root / "wgan_clip", x_tr, y_tr, clip=0.01)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: tiny_lm/ not regenerated (pip install -e '.[hf]')")
    else:
        make_lm(root)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
