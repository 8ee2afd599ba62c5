"""The recipe: one YAML file that says everything a run does.

Every section is a pydantic v2 model with ``extra="forbid"`` so a typo is an error, not a silent default.
Field help lives next to the field (``description=``) and is what ``distillery validate --explain`` prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolchain.models.references import check_reference_syntax


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line and names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StudentConfig(_Section):
    from_: str = Field(
        "teacher",
        alias="from",
        description="'teacher' to prune the teacher's own layers, or a model reference (pip:, local path, hf:).",
    )
    keep_layers: int | None = Field(
        None, ge=1, description="Decoder layers kept when the student is the pruned teacher (None keeps all)."
    )
    select: Union[Literal["influence", "even"], list[int]] = Field(
        "influence",
        description="Which layers to keep: 'influence' (block influence, 1 - cos(in, out)), 'even', or explicit "
                    "indices.",
    )
    influence_samples: int = Field(48, ge=1, description="Teacher responses used to score block influence.")
    intermediate_size: int | None = Field(
        None, ge=32, multiple_of=32,
        description="Width pruning (toolchain/models/width.py): MLP channels kept in every layer, the ones the "
        "training answers activate least removed (Minitron's activation importance). A multiple of 32 (GGUF "
        "blocks); of 256 where a k-quant (q4_k_m, q5_k_m, q6_k) should quantize the down projection whole. None "
        "keeps them all.",
    )
    kv_heads: int | None = Field(
        None, ge=1,
        description="Width pruning: key/value head groups kept in every layer, each with all its query heads "
        "(grouped-query attention keeps its ratio), ranked by the heads' output on the training answers. None "
        "keeps them all.",
    )
    hidden_size: int | None = Field(
        None, ge=32, multiple_of=32,
        description="Width pruning of the residual stream: hidden channels kept in the embedding, every layer and "
        "the output layer, ranked by their normalised activations at every norm on the training answers (Minitron's "
        "embedding-channel importance); attention heads keep their size. A multiple of 32 (GGUF blocks); of 256 "
        "where a k-quant should quantize every projection whole (the embedded teacher's 576 is not: 512 is). "
        "Qwen2 and Phi-3 take it in PyTorch and ONNX but not in llama.cpp (refused with export.formats gguf). None "
        "keeps them all.",
    )
    vocab: int | None = Field(
        None, ge=0,
        description="Trim the student's vocabulary (see toolchain/models/vocab.py): keep the teacher's first N BPE "
        "tokens, every token of the recipe's prompts, the teacher's answers and the chat template (with the tokens "
        "they are built from), the byte tokens and the special tokens. Task text tokenizes exactly as before; the "
        "output layer shrinks (decode speed). None keeps the whole vocabulary. With soft-label the student matches the "
        "teacher's distribution over the kept tokens.",
    )

    @model_validator(mode="after")
    def _check_select(self) -> "StudentConfig":
        if isinstance(self.select, list):
            if len(set(self.select)) != len(self.select) or any(i < 0 for i in self.select):
                raise ValueError("select: layer indices must be distinct and >= 0")
            if self.keep_layers is not None and self.keep_layers != len(self.select):
                raise ValueError("keep_layers must equal the number of indices in select")
        return self


class ColumnsConfig(_Section):
    """Which column of a table (CSV, TSV, Parquet, JSONL records, a Hugging Face dataset) is which field."""

    text: str | None = Field(None, description="The input text (the prompt when there is no `template`).")
    gold: str | None = Field(None, description="The right answer or label the task's metric checks.")
    task: str | None = Field(None, description="The task name per row (default: data.task).")
    id: str | None = Field(None, description="A unique id per row (default: file name and row number).")
    system: str | None = Field(None, description="A per-row system message (replaces generate.system_prompt).")
    reference: str | None = Field(None, description="An answer you already have (see generate.answers).")


class DataConfig(_Section):
    train: list[str] = Field(
        ..., min_length=1,
        description="Training data: files (prompt JSONL, OpenAI chat JSONL, ShareGPT, Alpaca, CSV, TSV, Parquet, "
        "JSONL records), a saved Hugging Face dataset directory, or hf:<dataset id>[@revision]; `#split` after a "
        "dataset picks its split; traffic:<store>#task=NAME[&before=T][&from=T][&until=T] for one task's calls "
        "in a gateway's traffic store (distillery init STORE --task writes it). The format is detected per file "
        "unless data.format says it.",
    )
    heldout: list[str] = Field(default_factory=list, description="Held-out data (same forms), never trained on.")
    format: Literal["auto", "prompts", "chat", "sharegpt", "alpaca", "table"] = Field(
        "auto",
        description="auto: by extension and the first record's keys (messages: chat, conversations: sharegpt, "
        "instruction: alpaca, prompt: prompts, anything else: table).",
    )
    columns: ColumnsConfig = Field(
        default_factory=ColumnsConfig,
        description="table: the column of each field; a field left out is read from the column of its own name "
        "(text also from `prompt`).",
    )
    template: str | None = Field(
        None, description="table: the prompt, with {column} slots filled from each row ({text} is the text column).")
    task: str = Field("default", min_length=1, description="The task of rows that do not name one.")
    heldout_fraction: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="With no data.heldout: this fraction of the training rows is held out (seeded by data.seed, "
        "stratified by task).",
    )
    seed: int = Field(0, description="Seed of the held-out split.")
    reference_is_gold: bool = Field(
        False,
        description="A row without a gold answer takes its reference answer (a chat log's last assistant turn, an "
        "Alpaca output, a reference column) as the gold eval scores the student against: for logs of a strong "
        "model's answers, which are what a student should match.",
    )
    strip_instructions: bool = Field(
        False,
        description="Context distillation: the teacher answers with each row's system prompt and earlier turns (the "
        "task's instructions and few-shot examples) and generate.system_prompt; the student is trained, scored and "
        "served on the last user message alone, so a call pays only for the part that varies. Needs flavour hard, "
        "or soft with teacher_logits: cache; not on-policy.",
    )
    answers_from: str | None = Field(
        None,
        description="Who wrote the reference answers in the data (openai:gpt-4o, anthropic:<model>, google:<model>, "
        "open-weight:<model id>, human): their terms decide whether a student may be trained on them.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N training prompts (quick runs).")
    heldout_limit: int | None = Field(None, ge=1, description="Use only the first N held-out prompts.")

    @model_validator(mode="after")
    def _heldout_source(self) -> "DataConfig":
        if self.heldout and self.heldout_fraction is not None:
            raise ValueError("heldout_fraction: give either data.heldout files or a held-out fraction, not both")
        if self.template is not None:
            import string

            try:
                list(string.Formatter().parse(self.template))
            except ValueError as err:
                raise ValueError(f"template: {err} (write {{{{ and }}}} for literal braces)") from None
        return self


class GenerateConfig(_Section):
    backend: Literal["auto", "llama_cpp", "hf", "openai"] = Field(
        "auto", description="Teacher engine: auto picks llama_cpp for GGUF, hf for a model directory."
    )
    answers: Literal["teacher", "reference", "reference_else_teacher"] = Field(
        "teacher",
        description="Where the answers the student learns come from: teacher (asked here), reference (the answers "
        "already in the data: a chat log's last assistant turn, an output column; the teacher is not asked, rows "
        "without one are dropped), reference_else_teacher (the teacher answers only rows without one). The teacher "
        "still gives soft-label targets and is evaluated.",
    )
    keep: Literal["all", "pass"] = Field(
        "all",
        description="pass: a training answer whose row has a gold (else a reference) answer is kept only when the "
        "task's metric accepts it (rejection sampling); the rejected are counted in the manifest.",
    )
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Longest teacher answer; longer ones are dropped.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64, description="Teacher samples per prompt.")
    seed: int = 0
    system_prompt: str | None = Field(None, description="System message; None keeps the chat template's default.")
    prompt_template: str | None = Field(
        None,
        description="For base teachers without a chat template: the raw text sent to the teacher, with {prompt} "
        "where the prompt goes (e.g. 'Question: {prompt}\\nAnswer:'). None = the teacher's chat template.",
    )
    stop: list[str] = Field(default_factory=list, description="Strings that end a teacher answer (with "
                                                              "prompt_template).")
    n_ctx: int = Field(2048, ge=128, description="Teacher context window (llama.cpp).")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp (None = all cores).")
    batch: int = Field(
        8, ge=1, le=64,
        description="llama.cpp teacher, greedy chat answers: prompts decoded together, the prompt prefix they share "
        "read once (1 = one at a time). Changes tokens only at near ties; measured 1.7x on 2 cores.",
    )
    # An openai: teacher (vLLM, TGI, llama-server, a hosted API). None of these change the answers.
    concurrency: int = Field(
        1, ge=1, le=512, description="openai: teacher: requests in flight at once (local engines answer one at a time)."
    )
    requests_per_minute: float | None = Field(None, gt=0, description="openai: teacher: most requests started per "
                                                                      "minute.")
    timeout_s: float = Field(120.0, gt=0, description="openai: teacher: seconds before a request is abandoned and "
                                                      "retried.")
    max_retries: int = Field(
        8, ge=0, le=100,
        description="openai: teacher: retries per prompt on 429, 5xx, timeouts and refused connections, with "
        "exponential backoff (honouring Retry-After). A prompt that still fails stops the stage; answers so far are "
        "kept.",
    )
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="openai: teacher: the environment variable holding the API key. Without it no key is sent, "
        "except OPENAI_API_KEY to OpenAI's own API (api.openai.com). The key itself never goes in a recipe.",
    )
    logprobs: int | None = Field(
        None, ge=1, le=20, description="openai: teacher: record the top-k log-probs of every answer token when the "
                                       "server returns them."
    )
    usd_per_1m_input: float | None = Field(
        None, ge=0.0, description="openai: teacher: the endpoint's price per 1M prompt tokens (default: "
                                  "cost.reference_api_*)."
    )
    usd_per_1m_output: float | None = Field(None, ge=0.0, description="openai: teacher: its price per 1M answer "
                                                                      "tokens.")

    @model_validator(mode="before")
    @classmethod
    def _no_keys(cls, data):
        if isinstance(data, dict) and any(k in data for k in ("api_key", "key", "token")):
            raise ValueError("API keys never go in a recipe: put the key in an environment variable and name the "
                             "variable in generate.api_key_env")
        return data

    @field_validator("prompt_template")
    @classmethod
    def _has_slot(cls, v: str | None) -> str | None:
        if v is not None and "{prompt}" not in v:
            raise ValueError("must contain {prompt} where the prompt text goes")
        return v


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters. lm_head/embed_tokens are refused on tied models.",
    )


class SoftConfig(_Section):
    """Soft-label KD (Hinton et al. 2015): match the teacher's token distribution, not only its tokens."""

    loss: Literal["forward_kl", "reverse_kl", "jsd", "total_variation"] = Field(
        "forward_kl", description="Divergence: forward KL (mode-covering), reverse KL (mode-seeking), generalized "
        "JSD, or total variation (one minus the chance a speculative step accepts the student's token: the loss of "
        "a draft model, DistillSpec)."
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (0 = forward KL, 1 = reverse KL).")
    temperature: float = Field(
        1.0, gt=0.0, le=20.0,
        description="Softens both distributions; the loss is scaled by T². With a top-k cache keep T near 1: on "
        "SmolLM2 the top-32 hold 93% of the teacher's mass at T=1 but 30% at T=2.",
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = alpha·KD + (1 - alpha)·CE on the teacher's tokens.")
    teacher_logits: Literal["online", "cache"] = Field(
        "cache", description="online: teacher forward pass every step; cache: top-k written once by generate."
    )
    top_k: int = Field(32, ge=1, description="Teacher log-probs kept per position in the cache (the rest is one tail "
                                             "bucket); across tokenizers, the sorted probabilities compared.")
    uld_weight: float | None = Field(
        None, ge=0.0, description="Across tokenizers (teacher and student vocabularies differ): the weight of the "
        "sorted-probability distance at answer tokens the two tokenizers do not cut alike (training/cross_vocab.py);"
        " None: 1.0; 0 leaves them to cross-entropy.")


class ReasoningConfig(_Section):
    """Reasoning distillation: the teacher thinks step by step, only traces whose answer checks are kept."""

    instruction: str = Field(
        "Think step by step. Then give the final answer on its own last line as 'Answer: <answer>'.",
        description="Appended to each prompt when the teacher answers.",
    )
    answer_pattern: str = Field(
        r"(?i)answer\s*(?:is|:|=)\s*\**\s*([^\n]+)",
        description="Regex; group 1 of the last match is the final answer ('Answer: 7', 'The final answer is 7').",
    )
    keep_without_gold: bool = Field(False, description="Keep traces of prompts that have no gold answer to check.")
    train_with_instruction: bool = Field(
        False, description="Train on the prompt with the instruction (else the student reasons unprompted)."
    )
    served_output: Literal["keep", "strip"] = Field(
        "strip", description="Whether the served student returns its reasoning or only the final answer."
    )

    @field_validator("answer_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        import re

        try:
            if re.compile(v).groups < 1:
                raise ValueError("needs one capture group for the answer")
        except re.error as err:
            raise ValueError(f"not a valid regex ({err})") from None
        return v


class OnPolicyConfig(_Section):
    """On-policy distillation (GKD, Agarwal et al. 2024; on-policy distillation as in Qwen3): on a share of the
    optimizer steps the student answers the batch's prompts itself and the teacher scores every token it wrote."""

    fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="GKD's lambda: the share of optimizer steps trained on the student's own samples (0 = off-policy "
        "only, 1 = every step). Spread evenly: at 0.25 every fourth step.",
    )
    samples_per_prompt: int = Field(
        1, ge=1, le=64,
        description="Rollouts per prompt; a step keeps batch_size sequences, so it samples batch_size / this prompts.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest student sample, in tokens.")
    temperature: float = Field(
        1.0, ge=0.0, le=5.0,
        description="Sampling temperature of the rollouts (0 = greedy). sampled_reverse_kl is unbiased at 1.")
    loss: Literal["jsd", "forward_kl", "reverse_kl", "total_variation", "sampled_reverse_kl"] = Field(
        "jsd",
        description="On the student's samples: a divergence over the whole (or trimmed) vocabulary at every sampled "
        "position (jsd uses distill.soft.beta, all use distill.soft.temperature), or sampled_reverse_kl: student "
        "log-prob minus teacher log-prob of the sampled token, used as a per-token advantage (a policy-gradient "
        "estimate of reverse KL; cheapest, noisiest).",
    )


class QuantizationAwareConfig(_Section):
    """The last optimizer steps see the weights as llama.cpp will store them (training/qat.py)."""

    type: Literal["q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_1", "q4_0", "iq4_nl"] = Field(
        description="The export.quants type the student is trained for: each weight in the forward pass is "
        "llama.cpp's own quantization of it for this preset (the type its quantizer gives that tensor), the gradient "
        "passes straight through. Export then stores exactly those values.")
    steps: int = Field(
        30, ge=1, description="How many of the last optimizer steps train against the quantized weights (the rest "
        "train in float32 first).")


class RecoveryConfig(_Section):
    """Before the task phase, the pruned student learns the teacher's next-token distribution on broad text, to give
    back what the cut layers held (training/recovery.py)."""

    text: Literal["teacher"] | list[str] = Field(
        "teacher", description="'teacher': sequences the teacher writes itself from a random first token (data-free, "
        "as LLM-QAT generates its training text), sampled over the student's vocabulary; or plain-text files (.txt: "
        "passages separated by a blank line; .jsonl: a 'text' field per line), e.g. a slice of a pretraining corpus.")
    sequences: int = Field(512, ge=1, description="How many sequences of text (the first this-many of the files).")
    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per sequence (longer text is cut).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps (None: one pass over the sequences at "
                              "distill.batch_size).")
    lr: float | None = Field(None, gt=0, lt=1.0, description="Peak learning rate (None: distill.lr).")
    temperature: float = Field(1.0, gt=0, description="The distillation temperature, and the teacher's sampling "
                               "temperature for text: teacher.")


class ValidationConfig(_Section):
    """A slice of the training prompts kept out of training and scored as eval scores held-out prompts; which
    weights ship is chosen there, not on the held-out prompts eval reports (training/validation.py)."""

    fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="Of each task's training prompts (every sample of a chosen prompt leaves "
        "training), chosen by a seeded hash of the prompt id.")
    max_prompts: int = Field(200, ge=1, description="At most this many prompts in all, shared among the tasks in "
                             "proportion.")
    every: int | None = Field(None, ge=1, description="Optimizer steps between scorings (None: after every epoch); "
                              "the last step is always scored.")
    keep: Literal["best", "last"] = Field(
        "best", description="best: the weights of the scoring with the most right answers against the gold "
        "(ties and slices without gold: the lowest teacher-forced loss on the teacher's answers); last: the final "
        "weights (the slice is then only a report).")


class DistillConfig(_Section):
    flavour: Literal["hard", "soft", "reasoning"] = Field(
        "hard", description="hard: teacher responses as labels; soft: match teacher distributions; reasoning: "
        "verified chain-of-thought traces as labels."
    )
    soft: SoftConfig = Field(default_factory=SoftConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    warmup_epochs: float = Field(
        0.0, ge=0.0,
        description="The first this-many of `epochs` train with plain cross-entropy on the teacher's answers, then "
        "the soft-label / on-policy loss (a hard-label warm start: the student's first samples are then worth "
        "scoring).",
    )
    method: Literal["lora", "full"] = Field("full", description="LoRA adapters or a full fine-tune.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(2.0, gt=0, description="Passes over the kept teacher data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(2e-4, gt=0, lt=1.0, description="Peak learning rate (cosine decay after warmup).")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step (global).")
    seq_len: int = Field(256, ge=16, le=32768, description="Longest prompt+response in tokens; longer are cut.")
    seed: int = 0
    checkpoint_every: int = Field(25, ge=1, description="Optimizer steps between resumable checkpoints.")
    train_embeddings: bool = Field(False, description="Also train the (tied) embedding matrix in full fine-tune.")
    train_norms: bool = Field(
        False, description="LoRA: also train every RMSNorm weight in full (tiny; saved with the adapter, merged)."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = all cores).")
    bf16: bool = Field(False, description="bfloat16 autocast for the forward passes (fast on recent CPUs and GPUs).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The trainable student's weights. Below float32 the optimizer keeps float32 master "
        "copies (AdamW updates of 1e-4 vanish in bfloat16's 8-bit mantissa) and the loss is float32.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The frozen teacher's weights (online and on-policy soft-label, pruning): bfloat16 "
        "halves its memory (a 7B teacher: 14 GB instead of 28).")
    teacher_device: str | None = Field(
        None, description="Where the frozen teacher runs, e.g. cuda:1 (None: with the student). Logits come back to "
        "the student's device.")
    loss_chunk: int | None = Field(
        None, ge=0, description="Positions projected to the vocabulary at a time in the loss, student and online "
        "teacher alike (same loss and gradients; peak memory of one chunk's logits). None: automatic (about 128 MB "
        "of float32 logits per chunk: 220 positions at a 151,936-token vocabulary); 0: never chunk.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student's layer activations in backward instead of keeping them (less "
        "memory, ~30% more compute; the shared-prompt-prefix saving is off then).")
    quantization_aware: QuantizationAwareConfig | None = Field(
        None, description="Train the file that ships: {type: iq4_nl, steps: 30} (or just the type) makes the last "
        "steps quantization-aware for that GGUF type (training/qat.py). Needs a full fine-tune and the type in "
        "export.quants; export.imatrix rounds differently and is refused with it.")
    recovery: RecoveryConfig | None = Field(
        None, description="A recovery phase before the task phase: {text: teacher, sequences: 512, seq_len: 128} "
        "distills the teacher's full next-token distribution on broad text into the pruned student (Minitron's "
        "recovery; docs/student.md). Needs a local teacher with the student's tokenizer and a full fine-tune.")

    validation: ValidationConfig | None = Field(
        None, description="{fraction: 0.1} (or just the fraction): keep that slice of the training prompts out of "
        "training, answer it greedily after every epoch and keep the best weights by the tasks' own metrics "
        "(validation.jsonl; docs/student.md).")

    @field_validator("quantization_aware", mode="before")
    @classmethod
    def _qat_type_alone(cls, v):
        return {"type": v} if isinstance(v, str) else v

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_fraction_alone(cls, v):
        return {"fraction": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    def teacher_in_step(self) -> bool:
        """Whether the task phase runs the teacher at each step (online soft-label or on-policy scoring)."""
        return self.flavour == "soft" and (self.soft.teacher_logits == "online" or self.on_policy.fraction > 0)


class MergeConfig(_Section):
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Saved weight dtype.")
    tolerance: float = Field(
        5e-4, gt=0,
        description="Max |logit diff| between adapter and merged model. Storing float32 weights alone moves the "
        "logits of a 30-layer SmolLM2 student by up to 1.2e-4 (measured); a broken merge moves them by the adapter's "
        "whole effect.",
    )


class TaskConfig(_Section):
    """What a right answer is for one task of the prompt files (the ``task`` field of each row)."""

    metric: Literal["exact", "contains", "label", "number", "keywords", "regex", "json", "chrf", "judge"] = Field(
        "exact",
        description="exact: the trimmed answer equals the gold; contains: the gold appears in it (word-bounded); "
        "label: the first of `labels` the answer names is the gold; number: the last number equals the gold "
        "within `tolerance`; keywords: every ';'-separated word of the gold appears ('|' between alternatives); "
        "regex: group 1 of `pattern`'s first match equals the gold; json: the answer is JSON whose `keys` (all "
        "of the gold's without them) equal the gold's; chrf: chrF against the gold reaches `threshold`; judge: a "
        "judge model compares the student's answer with the teacher's (both orders; win/tie/loss and a 0-1 score, "
        "no gold needed). Case-insensitive, except golds of one or two characters.",
    )
    judge: str | None = Field(
        None, description="judge: the judge model (any model reference, e.g. an openai: endpoint); default the "
                          "teacher.")
    rubric: str | None = Field(None, description="judge: what makes an answer better (replaces the default rubric).")
    judge_api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="judge: the environment variable holding the judge endpoint's API key (as generate.api_key_env "
        "for the teacher; without it no key is sent, except OPENAI_API_KEY to api.openai.com).",
    )
    pattern: str | None = Field(None, description="regex: the pattern searched in the answer (case-insensitive).")
    keys: list[str] | None = Field(None, description="json: the keys compared with the gold's (default: all of them).")
    threshold: float = Field(50.0, ge=0.0, le=100.0, description="chrf: the score (0-100) an answer must reach.")
    labels: list[str] | None = Field(
        None, description="label: the label set (default: every distinct gold value of the task's prompts).")
    tolerance: float = Field(1e-6, ge=0.0, description="number: relative tolerance.")
    max_words: int | None = Field(
        None, ge=1, description="An answer longer than this many words is wrong (a summary is not the input again).")
    min_retention: float | None = Field(
        None, ge=0.0, le=2.0,
        description="This task's gate floor instead of eval.min_retention, e.g. 0.6 for a knowledge probe "
        "outside the task being distilled. Applied to the results, so changing it re-runs nothing.",
    )

    @model_validator(mode="after")
    def _labels_for_label(self) -> "TaskConfig":
        if self.labels is not None and self.metric != "label":
            raise ValueError("labels only apply to metric: label")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels: a label task needs at least two labels")
        if (self.pattern is not None) != (self.metric == "regex"):
            raise ValueError("pattern: metric regex needs a pattern, and only it takes one")
        if self.pattern is not None:
            import re

            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern: not a regular expression ({err})") from None
        if self.keys is not None and self.metric != "json":
            raise ValueError("keys only apply to metric: json")
        if (self.judge is not None or self.rubric is not None or self.judge_api_key_env is not None) \
                and self.metric != "judge":
            raise ValueError("judge, rubric and judge_api_key_env only apply to metric: judge")
        if self.judge is not None:
            check_reference_syntax(self.judge)
        return self

    def spec(self, gold_values: list[str] = ()) -> dict:
        """The scoring spec toolchain.quality.metrics.check reads (labels inferred from ``gold_values`` when not
        given)."""
        labels = self.labels if self.labels is not None else sorted(set(gold_values))
        return {"metric": self.metric, "labels": labels if self.metric == "label" else None,
                "tolerance": self.tolerance, "max_words": self.max_words, "pattern": self.pattern, "keys": self.keys,
                "threshold": self.threshold}


class CascadeConfig(_Section):
    """The cascade eval reports: the student answers the calls it is sure of, the teacher the rest."""

    targets: list[float] = Field(
        default_factory=lambda: [0.95, 0.98, 1.0],
        description="Retentions of the teacher's gold the combined answers must keep; one row of the cascade table "
        "each.")
    calibration: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Share of each task's held-out prompts the thresholds (and the confidence score) are chosen on; "
        "the table reports the rest.")
    rule: Literal["lower", "point"] = Field(
        "lower", description="lower: a threshold reaches a target when the one-sided lower bound of the combined "
        "retention does (at eval.gate_level); point: when its point estimate does.")
    seed: int = Field(0, description="Seed of the calibration split.")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if not v or any(not 0.0 < t <= 2.0 for t in v):
            raise ValueError("each target is a retention above 0 (1.0: the teacher's gold)")
        return v


class EvalConfig(_Section):
    min_retention: float = Field(
        0.9, ge=0.0, le=2.0,
        description="Quality gate: student/teacher gold accuracy, per task and overall, below which eval fails "
        "(and `make` stops before export); tasks.<name>.min_retention overrides it per task. Applied to the "
        "results, so changing it re-runs nothing.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest answer generated per held-out prompt.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out prompts.")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size (the same for every model).")
    seed: int = Field(1234, description="lm-eval's random, numpy and torch seeds.")
    base: bool | None = Field(
        None,
        description="Also evaluate the student before distillation. None (default): only for a pretrained "
        "student (student.from a model); an untrained pruned copy of the teacher is skipped unless true.",
    )
    teacher_answers: Literal["auto", "generate", "regenerate"] = Field(
        "auto",
        description="Where the teacher's held-out answers come from. generate: the greedy answers it gave in the "
        "generate stage, scored by the same per-prompt metrics (the teacher is not run again; its likelihood "
        "tasks still run). regenerate: lm-eval generates them again. auto: generate where those answers are "
        "what lm-eval would produce (greedy, and no shorter limit than eval.max_new_tokens) or the teacher is "
        "an endpoint, else regenerate.",
    )
    gate: Literal["noninferior", "confident", "point"] = Field(
        "noninferior",
        description="noninferior: a task passes only when the one-sided lower confidence bound of its retention "
        "(a score test on the paired outcomes) is at or above its floor, with Holm's correction over the gated "
        "tasks and the pool; a task that is neither shown above nor below is undecided (exit 3 unless "
        "allow_undecided). confident: a task fails only when it is significantly below its floor. point: when its "
        "retention is below its floor. See docs/evaluation.md.",
    )
    gate_level: float = Field(
        0.05, gt=0.0, lt=0.5,
        description="The gate's level: noninferior, the family-wise chance of passing any task (or the pool) whose "
        "true retention is below its floor; confident, the one-sided level of each task's test.",
    )
    allow_undecided: bool = Field(
        False, description="noninferior: let a task the held-out prompts cannot decide pass with its note (the run "
        "then exits 0; the report still says undecided).")
    gate_margin: float = Field(
        0.1, gt=0.0, le=1.0,
        description="confident and point: a task whose 95% retention interval is wider than floor ± margin is "
        "reported as too few prompts to judge (with how many would do); noninferior says it as 'undecided'.",
    )
    bootstrap_iters: int = Field(10_000, ge=100, le=1_000_000, description="Bootstrap resamples for every interval.")
    log_samples: bool = Field(False, description="Keep every sample in samples.jsonl (also: eval --log-samples).")
    cascade: CascadeConfig = Field(
        default_factory=CascadeConfig,
        description="The cascade table (from the student's confidence in each held-out answer); applied to the "
        "results, so changing it re-runs nothing.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "task_min_retention" in data:
            raise ValueError("task_min_retention moved to the tasks section: write "
                             "tasks: {<task>: {min_retention: <floor>}}")
        return data


class ExportConfig(_Section):
    formats: list[Literal["gguf", "onnx"]] = Field(
        default_factory=lambda: ["gguf", "onnx"], description="Which files to build (also: export --format)."
    )
    quants: list[Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_1", "q4_0",
                         "iq4_nl"]] = Field(
        default_factory=lambda: ["f16", "q8_0", "iq4_nl"],
        description="GGUF types, quantized by llama.cpp itself. k-quants (q4_k_m, q5_k_m, q6_k) work in blocks of "
        "256 and fall back to bigger types on rows that are not a multiple of it (most small models' hidden sizes: "
        "576, 896, 960); q4_0, q4_1, q5_0 and iq4_nl use blocks of 32. iq4_nl is the default 4-bit type: on the "
        "default student the smallest file within 0.02 retention of q8_0 (docs/export.md).",
    )
    imatrix: bool = Field(
        False,
        description="Quantize every type below q8_0 with llama.cpp's importance matrix, computed on the training "
        "conversations (prompts and answers through the chat template; never the held-out set). llama-imatrix and "
        "llama-quantize are built once from the runtime's own llama.cpp source (needs cmake and a C++ compiler).",
    )
    imatrix_chunks: int = Field(
        64, ge=1, le=10_000,
        description="At most this many windows of 512 tokens (shorter for a small training set) go into the importance "
        "matrix.",
    )
    onnx: list[Literal["fp32", "int8", "int8_nbits", "int4", "genai_int4", "genai_fp32"]] = Field(
        default_factory=lambda: ["fp32", "int8"],
        description="ONNX variants: fp32; int8 (onnxruntime quantize_dynamic: int8 weights and activations); "
        "int8_nbits / int4 (weight-only MatMulNBits, blocks of 32); genai_int4 / genai_fp32 (onnxruntime-genai's "
        "model builder: fused attention, int4 RTN weights; runs in onnxruntime and onnxruntime-genai).",
    )
    check_tokens: int = Field(32, ge=1, le=512, description="Greedy tokens compared with PyTorch per check prompt.")
    score: bool = Field(True, description="Score every exported file on the held-out tasks (lm-eval, as eval does).")

    @field_validator("quants", "onnx")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each entry once")
        return v


class ServeCascadeConfig(_Section):
    """Which threshold a cascading server routes on."""

    target: float = Field(
        0.98, gt=0.0, le=2.0,
        description="The row of eval's cascade table whose per-task thresholds and confidence scores route the calls "
        "(one of eval.cascade.targets).")
    score: Literal["min_prob", "mean_prob", "first_margin", "label"] | None = Field(
        None, description="Route every task on this confidence instead of the one eval chose per task.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Keep a call locally when the confidence is at or above this, for every task, instead of eval's "
        "thresholds (with score; in [0, 1]).")

    @model_validator(mode="after")
    def _both(self) -> "ServeCascadeConfig":
        if (self.threshold is None) != (self.score is None):
            raise ValueError("threshold: a fixed threshold needs the score it applies to (score), and score one to "
                             "apply (threshold)")
        return self


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Bind address; a non-loopback address needs an API key.")
    port: int = Field(8088, ge=1, le=65535)
    max_prompt_tokens: int = Field(2048, ge=1, description="Longer prompts get 400 (context_length_exceeded).")
    max_new_tokens: int = Field(512, ge=1, description="The most tokens one request may ask for (400 beyond).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    max_queue: int = Field(64, ge=1, description="Requests waiting or running at once; more get 429.")
    constrain: Literal["none", "task"] = Field(
        "none",
        description="task: a request that names a task (header X-Distillery-Task, or metadata.task) is decoded under "
        "that task's constraint from `tasks:` (label metric: exactly one of its labels; json metric with keys: an "
        "object with those keys); llama.cpp backend only.",
    )
    task: str | None = Field(
        None, description="With constrain: task, the task a request that names none is decoded as (a server for one "
        "task).",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Used when a request does not say (0 = greedy).")
    n_ctx: int = Field(4096, ge=256, description="llama.cpp context size.")
    n_gpu_layers: int = Field(
        0, ge=-1,
        description="llama.cpp: layers offloaded to the GPU (-1: all). Needs llama-cpp-python built with a GPU "
        "backend (make LLAMA_ISA=cuda LLAMA_CMAKE_ARGS=-DGGML_CUDA=ON); serve refuses it on a CPU-only build.",
    )
    onnx_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference, e.g. [CUDAExecutionProvider, "
        "CPUExecutionProvider] with onnxruntime-gpu installed; serve refuses one this onnxruntime lacks.",
    )
    stream_interval_ms: float = Field(
        16.0, ge=0.0, le=1000.0,
        description="Streamed text goes out at most this often: the first token at once, then what has been "
        "generated since, several tokens to an event when the model is faster (the rest when the answer ends). "
        "0 = an event per token. Each event costs the server and its client CPU; on 2 cores 16 ms measured "
        "1.03x raw decode speed against 0.93x per token.",
    )
    batch: int = Field(
        1, ge=1, le=64,
        description="llama.cpp: requests decoded together (continuous batching; each step's time is shared out in "
        "the per-request cost). 1 = one request at a time, bit-identical to llama-cpp-python.",
    )
    route: Literal["student", "cascade"] = Field(
        "student",
        description="cascade: the student answers first and a call whose confidence is below its task's threshold "
        "(serve.cascade) is answered by serve.upstream instead; streamed calls are decided after the student's whole "
        "answer, before the first byte leaves (docs/serving.md).",
    )
    upstream: str | None = Field(
        None,
        description="openai:<base_url>[#<model>]: the teacher or API that answers forwarded (cascade) and shadow "
        "calls, e.g. `distillery serve --model teacher` on another port. Default: the recipe's teacher when it is "
        "an openai: endpoint (its key from generate.api_key_env).",
    )
    upstream_key_env: str | None = Field(
        None, description="The environment variable holding serve.upstream's API key (never sent elsewhere).")
    cascade: ServeCascadeConfig = Field(default_factory=ServeCascadeConfig)
    shadow: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of calls answered by both the student and serve.upstream (chosen at random, whoever "
        "answers the client); each pair goes to serve.store for `distillery traffic --agreement`.",
    )
    store: str | None = Field(
        None,
        description="Traffic store (a SQLite file) where shadow pairs and forwarded calls are recorded; shadow needs "
        "one.",
    )

    def upstream_of(self, teacher: str) -> str | None:
        """Where forwarded and shadow calls go: serve.upstream, else an openai: teacher."""
        return self.upstream or (teacher if teacher.startswith("openai:") else None)


class BenchConfig(_Section):
    prompts: int = Field(16, ge=1, description="Held-out prompts per model and repeat.")
    max_new_tokens: int = Field(128, ge=8, description="Tokens generated per prompt.")
    repeats: int = Field(3, ge=1, description="Runs per model (teacher and student alternate); medians and spread "
                                              "reported.")
    backend: Literal["llama_cpp", "onnxruntime", "onnxruntime_genai"] = Field(
        "llama_cpp", description="onnxruntime_genai: onnxruntime-genai's own generation loop (genai_* variants)."
    )
    quant: str | None = Field(
        None, description="Type both models run at (default q8_0 / int8 / genai_int4); the teacher is rebuilt at it."
    )
    served: bool = Field(True, description="Also measure the student through `distillery serve` (streamed) against "
                                           "raw.")
    each_file: bool = Field(True, description="Also time every exported file once (speed per quantization, for the "
                                              "report).")
    concurrency: int = Field(
        4, ge=0, le=64,
        description="llama.cpp: also measure a busy server, this many requests decoding together (serve.batch); its "
        "tokens/s gives $ per 1M tokens at full load. 0 skips it.",
    )


class CostConfig(_Section):
    usd_per_hour: float = Field(0.10, ge=0.0, description="What the serving hardware costs per hour.")
    reference_api_usd_per_1m_output: float = Field(10.0, ge=0.0, description="Frontier API price being replaced.")
    reference_api_usd_per_1m_input: float = Field(2.5, ge=0.0, description="Its price per 1M prompt tokens.")
    distill_hardware_usd_per_hour: float = Field(
        0.10, ge=0.0, description="What the machine that ran generate + distill costs per hour (one-time cost, for "
                                  "ROI)."
    )


class LicenceConfig(_Section):
    teacher: str | None = Field(
        None, description="Teacher licence id when the model files do not say it (e.g. apache-2.0, gemma, llama3)."
    )
    acknowledge: str | None = Field(
        None, description="Free text accepting the teacher's terms; required for licences the guard does not allow."
    )


def _regex(pattern: str, where: str) -> str:
    import re

    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}not a regular expression ({err})") from None
    return pattern


class SynthesizeConfig(_Section):
    """More training prompts from the ones the data has: the teacher writes new inputs like the seeds, filtered,
    deduplicated and kept away from the held-out prompts, before generate answers them."""

    method: Literal["self_instruct", "evolve", "paraphrase", "fill"] = Field(
        "self_instruct", description="self_instruct: a new input like three seeds of the task (Self-Instruct); "
        "evolve: a seed rewritten harder or more varied (Evol-Instruct); paraphrase: a seed reworded; fill: the "
        "teacher writes only what varies between seeds of the same wording (the review, the text, the sentence) "
        "and it is put back in that wording (seeds without shared wording get a self_instruct prompt).")
    target: int = Field(
        ge=1, description="Training prompts to reach, seeds included, shared among the tasks as the seeds are.")
    per_seed: int = Field(1, ge=1, le=16, description="New prompts asked per seed in each round.")
    max_rounds: int = Field(20, ge=1, le=1000, description="Passes over the seeds before giving up on the target.")
    tasks: list[str] | None = Field(None, description="Only these tasks get new prompts (default: every seed task).")
    instruction: str | None = Field(
        None, description="What the teacher is asked ({examples}: the seed inputs, {seed}: one seed); default per "
        "method.")
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(160, ge=8, le=4096, description="Longest new prompt, in tokens.")
    min_words: int = Field(3, ge=1, description="Shorter new prompts are dropped.")
    max_words: int = Field(300, ge=1, description="Longer new prompts are dropped.")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="task -> a regular expression every new prompt of the task must match "
        "(its language or format, e.g. '^Classify the sentiment').")
    reject: str | None = Field(
        None, description="A regular expression: a new prompt (under fill, the text the teacher wrote) that matches it "
        "is dropped, e.g. the teacher talking about the task instead of writing it ('(?i)^(here|sure|I )').")
    dedup_threshold: float = Field(
        0.7, gt=0.0, le=0.98, description="A new prompt whose estimated Jaccard similarity (MinHash LSH, 128 "
        "permutations, word 2-shingles) with a seed or a kept prompt reaches this is a near-duplicate (at most 0.98: "
        "LSH needs two bands; exact duplicates are always dropped).")
    decontaminate_ngram: int = Field(5, ge=1, le=50, description="Word n-gram length for decontamination.")
    decontaminate_boilerplate: int = Field(
        2, ge=2, description="An n-gram found in this many held-out prompts or more is the tasks' wording, not a "
        "prompt's content, and counts for nothing in decontamination.")
    decontaminate_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="A new prompt sharing at least this share of its word n-grams with one "
        "held-out prompt is dropped (it would inflate every held-out score).")
    gold: Literal["none", "teacher"] = Field(
        "none", description="teacher: for tasks whose seeds have gold answers and whose metric compares a short "
        "answer (label, exact, contains, number), the teacher labels each new prompt `samples` times at "
        "`gold_temperature`; only prompts whose labels all agree are kept (self-consistency).")
    samples: int = Field(3, ge=2, le=16, description="gold: teacher: labels asked per new prompt.")
    gold_temperature: float = Field(0.3, gt=0.0, le=2.0, description="gold: teacher: sampling temperature of the "
                                    "labels (above 0, or the samples could not disagree).")
    seed: int = 0

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for task, pattern in v.items():
            _regex(pattern, f"{task}: ")
        return v

    @field_validator("reject")
    @classmethod
    def _reject(cls, v: str | None) -> str | None:
        return v if v is None else _regex(v, "")

    @model_validator(mode="after")
    def _words(self) -> "SynthesizeConfig":
        if self.min_words > self.max_words:
            raise ValueError("min_words is above max_words")
        return self


class Recipe(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; outputs go to runs/<name>/.")
    teacher: str = Field(..., min_length=1, description="Teacher model reference (pip:, local path, hf:, openai:).")
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig
    synthesize: SynthesizeConfig | None = Field(
        None, description="New training prompts written by the teacher before generate (off when absent).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict,
        description="Per task of the prompt files: how a gold answer is checked and its own gate floor. A task "
        "with gold answers and no entry is scored by exact match (eval.md says so).",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    licence: LicenceConfig = Field(default_factory=LicenceConfig)

    # Where the recipe file lives; data paths are resolved against the project root (cwd) first, then here.
    source: str | None = Field(None, exclude=True, description="Path the recipe was loaded from (set by load).")

    @field_validator("teacher")
    @classmethod
    def _teacher_ref(cls, v: str) -> str:
        check_reference_syntax(v)
        return v

    @model_validator(mode="after")
    def _serve_upstream(self) -> "Recipe":
        s = self.serve
        if s.shadow > 0 and s.store is None:
            raise ValueError("serve.store: serve.shadow keeps the pairs of answers in a traffic store; name one")
        if (s.route == "cascade" or s.shadow > 0) and s.upstream_of(self.teacher) is None:
            raise ValueError("serve.upstream: route: cascade and shadow send calls to the teacher or API, and the "
                             "teacher is not an openai: endpoint; name one, e.g. openai:http://127.0.0.1:8089/v1 for "
                             "`distillery serve --model teacher --port 8089`")
        if s.upstream is not None and (not s.upstream.startswith("openai:") or not s.upstream[7:].partition("#")[0]):
            raise ValueError(f"serve.upstream: expected openai:<base_url>[#<model>], got {s.upstream!r}")
        return self

    @model_validator(mode="after")
    def _student_vs_distill(self) -> "Recipe":
        for field in ("keep_layers", "intermediate_size", "kv_heads", "hidden_size"):
            if self.student.from_ != "teacher" and getattr(self.student, field) is not None:
                raise ValueError(f"student.{field} only applies when student.from is 'teacher'")
        if self.distill.warmup_epochs and self.distill.warmup_epochs >= self.distill.epochs:
            raise ValueError("distill.warmup_epochs: must be less than distill.epochs (it is part of them)")
        if self.distill.on_policy.fraction > 0 and self.distill.flavour != "soft":
            raise ValueError("distill.on_policy: on-policy distillation is a soft-label method; set distill.flavour: "
                             "soft")
        if self.data.strip_instructions and (
                self.distill.on_policy.fraction > 0 or self.distill.flavour == "reasoning"
                or (self.distill.flavour == "soft" and self.distill.soft.teacher_logits != "cache")):
            raise ValueError("data.strip_instructions: the teacher must see the instructions the student does not, "
                             "so its answers (flavour hard) or its cached top-k (flavour soft, teacher_logits: cache) "
                             "are computed once with them; online and on-policy teachers score the student's own "
                             "input, and reasoning keeps the instruction in training")
        if self.distill.on_policy.fraction > 0 and self.teacher.startswith("openai:"):
            raise ValueError("distill.on_policy: the teacher must score tokens it did not write, which only a local "
                             "teacher (HF directory, GGUF or pip: model) does here; an openai: endpoint cannot")
        if self.distill.flavour == "soft" and self.teacher.startswith("openai:"):
            soft, g = self.distill.soft, self.generate
            if soft.teacher_logits != "cache":
                raise ValueError("distill.soft.teacher_logits: an openai: teacher gives soft labels only through the "
                                 "cache (the top log-probs it returns with each answer); set it to cache")
            if not g.logprobs or g.logprobs < soft.top_k:
                raise ValueError(f"generate.logprobs: soft-label from an openai: teacher needs its top log-probs: set "
                                 f"generate.logprobs to at least distill.soft.top_k ({soft.top_k}; servers give up to "
                                 f"20)")
            if soft.temperature != 1.0:
                raise ValueError("distill.soft.temperature: an endpoint's log-probs are at temperature 1; only 1.0 "
                                 "works with an openai: teacher")
            if self.student.from_ == "teacher":
                raise ValueError("student.from: an openai: teacher has no weights to start a student from; name a "
                                 "local model with the teacher's tokenizer")
        if self.distill.method == "lora":
            bad = {"lm_head", "embed_tokens"} & set(self.distill.lora.targets)
            if bad:
                raise ValueError(
                    f"distill.lora.targets: {sorted(bad)} share weights in tied models; adapters there break tying"
                )
        q = self.distill.quantization_aware
        if q is not None and self.distill.validation is not None and self.distill.validation.keep == "best":
            raise ValueError("distill.validation.keep: best may ship weights from before the quantization-aware steps "
                             "(distill.quantization_aware); set keep: last to score the slice without choosing")
        if q is not None:
            if self.distill.method != "full":
                raise ValueError("distill.quantization_aware: trains the weights the file stores, which needs "
                                 "distill.method: full (a LoRA adapter is added to them only at merge)")
            if "gguf" not in self.export.formats or q.type not in self.export.quants:
                raise ValueError(f"distill.quantization_aware: {q.type} is not among the GGUF files export writes; "
                                 f"add it to export.quants")
            if self.export.imatrix:
                raise ValueError("distill.quantization_aware: export.imatrix quantizes with other rounding than the "
                                 "training saw; set export.imatrix: false")
        if self.distill.recovery is not None:
            if self.distill.method != "full":
                raise ValueError("distill.recovery: trains the whole pruned student before its task; it needs "
                                 "distill.method: full")
            if self.teacher.startswith("openai:"):
                raise ValueError("distill.recovery: needs the teacher's logits at every position of the text, which an "
                                 "openai: teacher does not return; name a local teacher")
            if self.student.from_ != "teacher":
                raise ValueError("distill.recovery: gives back what pruning took from a student cut from the teacher; "
                                 "it needs student.from: teacher")
        return self

    def task_floors(self) -> dict[str, float]:
        """The tasks that set their own gate floor."""
        return {name: t.min_retention for name, t in self.tasks.items() if t.min_retention is not None}

    def task_specs(self, rows: list[dict]) -> dict[str, dict]:
        """The scoring spec of each task of ``rows`` (dicts with task and gold): its ``tasks:`` entry, labels
        inferred from its gold values where the recipe gives none, or exact match for an undeclared task."""
        golds: dict[str, list[str]] = {}
        for r in rows:
            golds.setdefault(r["task"], []).extend([r["gold"]] if r.get("gold") is not None else [])
        return {t: self.tasks.get(t, TaskConfig()).spec(g) for t, g in golds.items()}

    def section(self, name: str) -> dict:
        """A section as plain JSON-able data (used for stage keys)."""
        return json.loads(getattr(self, name).model_dump_json(by_alias=True))

    def student_source(self) -> str:
        """The model reference the student starts from: the teacher for a layer cut, else student.from."""
        return self.teacher if self.student.from_ == "teacher" else self.student.from_

    def student_system_prompt(self) -> str | None:
        """The system prompt the student is trained, scored and served with: the recipe's, unless
        data.strip_instructions keeps every instruction for the teacher alone."""
        return None if self.data.strip_instructions else self.generate.system_prompt

    def data_path(self, p: str) -> Path:
        path = Path(p)
        if path.is_absolute() or path.exists() or self.source is None:
            return path
        return Path(self.source).parent / path


def _format_error(path: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]).replace("from_", "from")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{path}: {where}{msg}{more}"


def parse(data: object, path: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate({**data, "source": path})
    except ValidationError as err:
        raise RecipeError(_format_error(path, err)) from None
    except RecipeError as err:
        raise RecipeError(f"{path}: teacher: {err}") from None


def load(path: str | Path) -> Recipe:
    """Read and validate a recipe file; any problem becomes one RecipeError line."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse(data, str(p))


def dump(recipe: Recipe) -> str:
    data = json.loads(recipe.model_dump_json(by_alias=True, exclude={"source"}))
    return yaml.safe_dump(data, sort_keys=False)
