"""Fine-tuning job requests and objects, shaped like OpenAI's (plus our LoRA fields)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Auto = Literal["auto"]
_MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$"


class StrictModel(BaseModel):
    """Request bodies: unknown fields are refused, naming the field, and values of the wrong
    JSON type are refused rather than converted (``true`` is not 1 epoch, ``"yes"`` is not a
    boolean); a JSON integer is still a valid float."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SupervisedHyperparameters(StrictModel):
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = Field(
        default="auto", description="Examples per optimizer step."
    )
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = Field(
        default="auto", description="Scales the recipe's base learning rate (2e-4 for LoRA)."
    )
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = Field(
        default="auto", description="Passes over the training file."
    )
    # loraplex extensions (DESIGN §4).
    lora_rank: Auto | Annotated[int, Field(ge=1, le=256)] = Field(
        default="auto", description="LoRA rank r: capacity of the adapter (auto: 16)."
    )
    lora_alpha: Auto | Annotated[int, Field(ge=1, le=1024)] = Field(
        default="auto", description="LoRA scaling alpha (auto: 2 x rank)."
    )
    lora_dropout: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.0, description="Dropout on the LoRA path."
    )
    target_modules: (
        Literal["all-linear"]
        | Annotated[
            list[Annotated[str, StringConstraints(pattern=_MODULE_NAME)]],
            Field(min_length=1, max_length=32),
        ]
    ) = Field(default="all-linear", description="Modules that get adapters.")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="Quantize the frozen base (QLoRA); needs CUDA workers."
    )
    max_seq_len: Auto | Annotated[int, Field(ge=64, le=131072)] = Field(
        default="auto",
        description="Longest tokenized example (auto: the smaller of the base model's context "
        "and 2048).",
    )
    packing: bool = Field(
        default=True, description="Pack short examples into one sequence (no cross-attention)."
    )


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = Field(
        default="auto", description="DPO temperature: how far the policy may move (auto: 0.1)."
    )
    packing: bool = Field(default=False, description="Packing is not used for DPO.")

    @field_validator("packing")
    @classmethod
    def _no_packing(cls, value: bool) -> bool:
        if value:
            raise ValueError("packing is not supported for DPO")
        return value


class SupervisedMethod(StrictModel):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(StrictModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(StrictModel):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


# No NUL: Postgres cannot store it in JSON, and no one means it.
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00]*$")]


class CreateJobRequest(StrictModel):
    model: Annotated[str, StringConstraints(min_length=1, max_length=400)]
    training_file: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    validation_file: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    method: Method | None = None
    # Deprecated by OpenAI in favour of method; still accepted, as OpenAI does.
    hyperparameters: SupervisedHyperparameters | None = None
    integrations: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(
        default=None, description="Not supported; must be empty."
    )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    batch_size: Auto | int
    learning_rate_multiplier: Auto | float
    n_epochs: Auto | int


class FineTuningJobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal[
        "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"
    ]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    integrations: list[dict[str, Any]] | None = None
    estimated_finish: int | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobObject]
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventObject]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
