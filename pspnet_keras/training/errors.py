"""The errors of a training run."""


class TrainingError(Exception):
    """A training run that cannot go on; the message is one line saying why and what to do."""


class NonFiniteWeights(TrainingError):
    """Weights holding NaN or infinity, which are never written; `path` names the variable."""

    def __init__(self, path):
        super().__init__(f"the weights are not finite ({path}); nothing was written")
        self.path = path
