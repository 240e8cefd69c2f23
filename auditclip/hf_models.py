"""``--model hf``: Hugging Face models built from a checkpoint's own ``config.json``, no factory.

For a checkpoint folder with ``config.json`` (``save_pretrained``, a ``Trainer``'s
``checkpoint-<step>/``), the model is ``AutoModelFor<Task>.from_config(config)``, the task
read from ``config.architectures`` (``GPT2LMHeadModel`` -> causal-lm) or given with
``--hf-task``; the weights come through auditclip's own readers (any format it reads),
copied in place into a model built once per distinct config, so N checkpoints x V clip
variants build one model. Tied weights (GPT-2's ``lm_head.weight``, absent from the file)
are filled by the tensor the model ties them to. Nothing is downloaded; the checkpoint's
own Python code (``auto_map``) runs only with ``--trust-remote-code``.

A PEFT adapter folder (``adapter_config.json``) is evaluated as base + adapter: the base
model is built and loaded from the folder ``adapter_config.json`` names
(``base_model_name_or_path``, when it is a local folder) or ``--base PATH``, wrapped by
peft from the adapter's config, and each checkpoint's adapter tensors are loaded into
it (``set_peft_model_state_dict``): the scores are ``PeftModel``'s own forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InputError
from .formats.peft import ADAPTER_CONFIG, is_adapter_folder, read_adapter_config
from .modelref import ModelLoader, one_line
from .notices import note

#: ``--model`` value that builds the model from the checkpoint's config.json
HF = "hf"
CONFIG = "config.json"
#: ``--hf-task`` -> the transformers auto class
HF_TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}
#: the end of an architecture's class name -> its task (first match wins)
_ARCH_SUFFIXES = (
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForMaskedLM", "masked-lm"),
    ("ForConditionalGeneration", "seq2seq-lm"), ("ForSeq2SeqLM", "seq2seq-lm"),
    ("ForSequenceClassification", "sequence-classification"), ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"), ("ForImageClassification", "image-classification"),
)
#: weights files of a Hugging Face model folder, in the order transformers prefers them
_BASE_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")


def task_of(architectures: Any) -> str:
    """The ``--hf-task`` a config's ``architectures`` imply (``base`` when none is known).

    >>> task_of(["GPT2LMHeadModel"]), task_of(["LlamaForCausalLM"]), task_of(["BertModel"]), task_of(None)
    ('causal-lm', 'causal-lm', 'base', 'base')
    """
    for arch in architectures or []:
        for suffix, task in _ARCH_SUFFIXES:
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return "base"


def model_folder(path: str | Path) -> Path | None:
    """The folder holding a checkpoint's ``config.json`` or ``adapter_config.json``: the
    checkpoint folder itself, or the folder of a weights file; None when there is none.

    >>> model_folder("sample_checkpoints/high_lr/epoch_01.safetensors") is None
    True
    """
    path = Path(path)
    for folder in (path, path.parent) if not path.is_dir() else (path,):
        if (folder / CONFIG).is_file() or (folder / ADAPTER_CONFIG).is_file():
            return folder
    return None


def is_hf_run(paths: list[Path]) -> bool:
    """True when the first checkpoint of a run is a Hugging Face model or PEFT adapter folder
    (so ``--model`` defaults to ``hf``).

    >>> is_hf_run([Path("sample_checkpoints/high_lr/epoch_01.safetensors")])
    False
    """
    return bool(paths) and model_folder(paths[0]) is not None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise InputError("--model hf needs transformers: pip install 'auditclip[hf]'") from exc
    return transformers


def base_weights_file(folder: Path) -> Path:
    """The weights file of a Hugging Face model folder (safetensors first, an index before a file).

    >>> base_weights_file(Path("sample_checkpoints/tiny_lm/checkpoint-36")).name
    'model.safetensors'
    """
    for name in _BASE_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no model weights in it (expected one of {', '.join(_BASE_WEIGHTS)})")


class HFModelLoader(ModelLoader):
    """Builds Hugging Face models from ``config.json`` and loads each checkpoint into them in place.

    ``load(state, label, path)`` builds (once per distinct config) the model of ``path``'s
    ``config.json`` (or base + adapter for a PEFT adapter folder) and copies ``state`` into it.

    >>> loader = HFModelLoader(task="causal-lm")
    >>> loader.ref, loader.causal
    ('hf', False)
    """

    _is_hf = True

    def __init__(self, *, strict: bool = True, strip_prefix: str | None = None, add_prefix: str | None = None,
                 device: torch.device | str = "cpu", task: str | None = None, base: str | None = None,
                 trust_remote_code: bool = False) -> None:
        if task is not None and task not in HF_TASKS:
            raise InputError(f"--hf-task {task!r}: use one of {', '.join(HF_TASKS)}")
        self.ref, self.strict, self.device = HF, strict, torch.device(device)
        self.strip_prefix, self.add_prefix = strip_prefix, add_prefix
        self.task, self.base, self.trust_remote_code = task, base, trust_remote_code
        self._factory, self._per_checkpoint = None, True
        self._model: torch.nn.Module | None = None
        self._models: dict[tuple[str, ...], torch.nn.Module] = {}
        self._base_states: dict[str, dict[str, torch.Tensor]] = {}
        self._tasks: dict[tuple[str, ...], str] = {}
        self._said: set[str] = set()
        #: whether the last model loaded is a causal LM (``--shift-labels auto``)
        self.causal = False

    # -- plain models ---------------------------------------------------------------------------
    def _config(self, folder: Path) -> Any:
        transformers = _transformers()
        try:
            return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                           trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            text = one_line(exc)
            if "trust_remote_code" in str(exc) and not self.trust_remote_code:
                raise InputError(f"{folder / CONFIG}: this model's code ships with the checkpoint (auto_map); "
                                 "--trust-remote-code runs that code, only for checkpoints you trust") from exc
            raise InputError(f"{folder / CONFIG}: transformers cannot read it: {text}") from exc

    def _plain(self, folder: Path) -> torch.nn.Module:
        """The model of ``config.json`` in ``folder``, built once per distinct config (and ``--hf-task``)."""
        key = ("plain", (folder / CONFIG).read_text(encoding="utf-8"), self.task or "")
        if key not in self._models:
            config = self._config(folder)
            task = self.task or task_of(getattr(config, "architectures", None))
            auto = getattr(_transformers(), HF_TASKS[task])
            try:
                model = auto.from_config(config, trust_remote_code=self.trust_remote_code)
            except Exception as exc:
                raise InputError(f"{folder / CONFIG}: cannot build {HF_TASKS[task]} from it: {one_line(exc)}; "
                                 f"choose another --hf-task ({', '.join(HF_TASKS)})") from exc
            said = f"--model hf: {type(model).__name__} ({task}) from {CONFIG}"
            if said not in self._said:
                self._said.add(said)
                note(said)
            self._models[key] = model.eval()
            self._tasks[key] = task
        self.causal = self._tasks[key] == "causal-lm"
        return self._models[key]

    def _model_for(self, path: str) -> torch.nn.Module:
        folder = model_folder(path)
        if folder is None or not (folder / CONFIG).is_file():
            raise InputError(f"--model hf: no {CONFIG} beside {path}; give --model module:factory "
                             "for a checkpoint without one")
        self._model = self._plain(folder)
        return self._model

    # -- adapters -------------------------------------------------------------------------------
    def _base_folder(self, adapter: Path) -> Path:
        if self.base:
            base = Path(self.base)
            if not (base / CONFIG).is_file():
                raise InputError(f"--base {self.base}: no {CONFIG} in it (expected a folder save_pretrained wrote)")
            return base
        named = read_adapter_config(adapter).get("base_model_name_or_path")
        for candidate in ([Path(named), adapter / named] if isinstance(named, str) and named else []):
            if (candidate / CONFIG).is_file():
                return candidate
        raise InputError(f"{adapter / ADAPTER_CONFIG}: its base model {named!r} is not a local folder with "
                         f"{CONFIG}; pass --base PATH (the base model's folder; nothing is downloaded)")

    def _adapted(self, adapter: Path) -> torch.nn.Module:
        """Base + adapter as peft builds it, once per (base folder, adapter config)."""
        base_folder = self._base_folder(adapter)
        adapter_text = (adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")
        key = ("peft", str(base_folder.resolve()), adapter_text, self.task or "")
        if key not in self._models:
            try:
                from peft import PeftConfig, get_peft_model
            except ImportError as exc:
                raise InputError("evaluating a PEFT adapter needs peft: pip install 'auditclip[hf]'") from exc
            base = self._plain_copy(base_folder)
            try:
                config = PeftConfig.from_pretrained(str(adapter))
                config.inference_mode = True
                with warnings.catch_warnings():  # "base_model_name_or_path was renamed": --base, said below
                    warnings.simplefilter("ignore")
                    model = get_peft_model(base, config)
            except Exception as exc:
                raise InputError(f"{adapter / ADAPTER_CONFIG}: peft cannot apply it to the base model in "
                                 f"{base_folder}: {one_line(exc)}") from exc
            note(f"--model hf: base model from {base_folder} with the adapter of each checkpoint (peft)")
            self._models[key] = model.eval()
        return self._models[key]

    def _base_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The base model's weights as stored (read once per folder)."""
        from .formats.readers import open_checkpoint_file

        key = str(folder.resolve())
        if key not in self._base_states:
            weights = base_weights_file(folder)
            try:
                with open_checkpoint_file(weights) as reader:
                    self._base_states[key] = {n: reader.get(n) for n in reader.names()}
            except CheckpointError as exc:
                raise InputError(f"--base {folder}: cannot read its weights: {exc}") from exc
        return self._base_states[key]

    def merged(self, state: Mapping[str, torch.Tensor], path: str) -> tuple[dict[str, torch.Tensor], str] | None:
        """``--clip-merged``: (the base weights with the adapter at ``path`` merged in, the base folder
        to evaluate them with), or None when ``path`` is no adapter folder."""
        from .adapters import merged_weights
        from .formats.peft import read_adapter_index

        folder = model_folder(path)
        if folder is None or not is_adapter_folder(folder):
            return None
        base = self._base_folder(folder)
        return merged_weights(self._base_state(base), dict(state), read_adapter_index(folder)), str(base)

    def _plain_copy(self, folder: Path) -> torch.nn.Module:
        """A fresh model of ``folder``'s config with its weights loaded (peft wraps it in place)."""
        config = self._config(folder)
        task = self.task or task_of(getattr(config, "architectures", None))
        model = getattr(_transformers(), HF_TASKS[task]).from_config(config, trust_remote_code=self.trust_remote_code)
        self._load_into(model, self._base_state(folder), str(base_weights_file(folder)))
        self.causal = task == "causal-lm"
        return model.eval()

    def load(self, state: Mapping[str, torch.Tensor], checkpoint: str, path: str | None = None) -> torch.nn.Module:
        folder = model_folder(path or checkpoint)
        if folder is None or not is_adapter_folder(folder):
            return super().load(state, checkpoint, path)
        model = self._adapted(folder)
        self._model = model
        self.last_loaded = self._load_adapter(model, state, checkpoint)
        self.causal = task_of(getattr(getattr(model, "config", None), "architectures", None)) == "causal-lm" \
            if self.task is None else self.task == "causal-lm"
        return model.to(self.device).eval()

    def _load_adapter(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                      checkpoint: str) -> tuple[int, int]:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        wanted = set(get_peft_model_state_dict(model))
        given = set(state)
        missing, unexpected = sorted(wanted - given), sorted(given - wanted)
        if self.strict and (missing or unexpected):
            parts = [f"{checkpoint}: the adapter does not match its adapter_config.json applied to the base model"]
            if missing:
                parts.append(f"missing: {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected: {', '.join(unexpected[:5])}")
            raise InputError("; ".join(parts))
        try:
            result = set_peft_model_state_dict(model, dict(state))
        except Exception as exc:
            raise InputError(f"{checkpoint}: peft cannot load the adapter: {one_line(exc)}") from exc
        if getattr(result, "unexpected_keys", None) and self.strict:
            raise InputError(f"{checkpoint}: peft left adapter tensors unused: {', '.join(result.unexpected_keys[:5])}")
        return len(wanted & given), len(wanted)

    def kinds_at(self, names: list[str], path: str) -> tuple[frozenset[str], frozenset[str]]:
        folder = model_folder(path)
        if folder is not None and is_adapter_folder(folder):
            return frozenset(), frozenset()  # an adapter folder's config decides (adapter_kinds_of)
        return super().kinds_at(names, path)

    def kinds(self, names: list[str]) -> tuple[frozenset[str], frozenset[str]]:
        if self._model is not None and hasattr(self._model, "peft_config"):
            return frozenset(), frozenset()  # an adapter folder's config decides (adapter_kinds_of)
        return super().kinds(names)

