"""Pydantic models of the service's JSON (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. unsupported_image, queue_full")
    detail: str = Field(description="human-readable explanation")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: list[str]


class InferenceBytes(BaseModel):
    per_image: int = Field(description="bytes of a predict's peak resident set per image of a batch, at the model's "
                                       "largest input")
    fixed: int = Field(description="bytes of a predict's peak resident set once per batch")
    budgeted_per_image: int = Field(description="what the in-flight budget reserves per request (at most a quarter "
                                                "of it)")
    budgeted_fixed: int = Field(description="what the in-flight budget reserves for the model's worker (the models' "
                                            "together at most half of it)")


class ModelInfo(BaseModel):
    name: str
    family: Literal["yolo", "rcnn"]
    architecture: str
    levels: int = Field(description="quantization levels L of the QANN (default wake steps)")
    classes: list[str]
    imgsz: Optional[int] = Field(None, description="network input size (YOLO letterbox)")
    default_wake: int
    default_sleep: Union[int, str]
    max_wake: int = Field(description="the most wake steps a request may ask for")
    max_sleep: int = Field(description="the most sleep steps a request may ask for (and the cap of 'auto')")
    sha256: Optional[str] = Field(None, description="sha256 of the checkpoint file served")
    verified: bool = Field(description="the sha256 matches an entry of the weights manifest")
    analog: list[str] = Field(default_factory=list, description="modules kept as analog islands (hybrid SNN)")
    engine: str = Field("pytorch", description="what runs the spiking networks: pytorch, or onnxruntime (no spike "
                        "counts: spikes and energy_uj are null)")
    inference_bytes: Optional[InferenceBytes] = Field(None, description="inference memory measured at start-up (null "
                                                      "with --no-budget-inference or where it cannot be measured)")
    default: bool = False


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Detection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in original image pixels", min_length=4, max_length=4)
    score: float
    class_id: int = Field(description="0-based class index")
    name: str


class ImageSize(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int = Field(1, description="images in the predict call this request was part of")


class DetectResponse(BaseModel):
    model: str
    image: ImageSize
    detections: list[Detection]
    steps: Optional[int] = Field(None, description="total time steps T = wake + sleep used")
    wake: Optional[int] = None
    sleep: Union[int, str]
    burst: Optional[int] = Field(None, description="spikes per neuron per sleep step (null: the wake count)")
    max_sleep: int = Field(description="cap of sleep='auto'")
    spikes: Optional[float] = None
    energy_uj: Optional[float] = Field(None, description="energy estimate, microjoules (45 nm figures)")
    settled: Optional[bool] = Field(None, description="the spiking network reached its fixed point (the answer "
                                                   "equals the QANN's)")
    timings: Timings


class StreamStep(BaseModel):
    """One NDJSON line (or SSE ``step`` event) of ``/v1/detect/stream``."""

    type: Literal["step"]
    stage: int = Field(description="1 for YOLO; 1 or 2 for Faster R-CNN")
    t: int = Field(description="total steps so far")
    phase: Literal["wake", "sleep"]
    wake: int
    spikes: Optional[float]
    cumulative_spikes: Optional[float]
    settled: bool
    detections: list[Detection]


class VideoFrame(BaseModel):
    """One NDJSON line of ``/v1/video``."""

    type: Literal["frame"]
    frame: int
    time_s: float
    detections: list[Detection]
    steps: Optional[int] = Field(description="steps of this frame: a keyframe's whole schedule, or a delta frame's "
                                 "change step and sleep until quiet")
    spikes: Optional[float]
    energy_uj: Optional[float]
    settled: Optional[bool] = None
    keyframe: Optional[bool] = Field(None, description="true: this frame ran the whole schedule; false: a delta "
                                                       "frame, which fed only its change from the previous one")
