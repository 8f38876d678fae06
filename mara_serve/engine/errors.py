"""The engine's exception hierarchy. No HTTP types here: the server maps these to status codes."""


class MaraError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(MaraError):
    """The base model could not be found, fetched or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model loads, but its architecture is not one the batched runner implements."""


class AgentLoadError(MaraError):
    """An agent file is missing, malformed, unsafe, or does not fit the base model."""


class InvalidRequestError(MaraError):
    """A request's parameters are invalid (the caller's fault)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested new tokens do not fit the model's context."""


class QueueFullError(MaraError):
    """The bounded waiting queue is full; the caller should retry later."""


class EngineNotReadyError(MaraError):
    """The engine is starting up or shutting down and admits no new requests."""


ENGINE_DEAD_MESSAGE = (
    "the inference engine failed and cannot serve requests; the server must be restarted"
)


class EngineDeadError(EngineNotReadyError):
    """The engine can no longer run the model (e.g. a device error on every forward): it admits
    nothing and ends every request with an error; the process must be restarted."""


class RequestAbortedError(MaraError):
    """The request was aborted (client disconnect or explicit abort)."""
