"""The dense ResNet-BK model: forward pass, training step, throughput."""

import torch

from bk.model import LanguageModel, ModelConfig

torch.set_num_threads(1)

VOCAB = 80
_MODELS: dict[int, LanguageModel] = {}


def model(n_seq: int) -> LanguageModel:
    if n_seq not in _MODELS:
        torch.manual_seed(0)
        _MODELS[n_seq] = LanguageModel(ModelConfig(vocab_size=VOCAB, n_seq=n_seq))
    return _MODELS[n_seq]


def tokens(batch: int, n_seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_seq), generator=torch.Generator().manual_seed(1))


class Forward:
    """The two target workloads: 32 x 128 tokens, and 4 x 1024 tokens."""

    params = ["32x128", "4x1024"]
    param_names = ["batch_x_seq"]

    def setup(self, shape):
        batch, n_seq = map(int, shape.split("x"))
        self.model = model(n_seq).eval()
        self.x = tokens(batch, n_seq)

    def time_forward(self, shape):
        with torch.no_grad():
            self.model(self.x)

    def track_tokens_per_second(self, shape):
        import time

        with torch.no_grad():
            self.model(self.x)
            start = time.perf_counter()
            self.model(self.x)
            return self.x.numel() / (time.perf_counter() - start)

    track_tokens_per_second.unit = "tokens/s"


class TrainStep:
    def setup(self):
        self.model = model(128).train()
        self.x = tokens(32, 128)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def time_train_step(self):
        out = self.model(self.x, self.x)
        self.optimizer.zero_grad()
        out.loss.backward()
        self.optimizer.step()
