"""How much of a sentence encoder's pretrained similarity structure survives continual training.

A fixed, hand-written set of sentence pairs of graded similarity (:data:`PAIRS`, grade 0 =
unrelated .. 4 = paraphrase; the grades are ours, written with the pairs, not from a dataset).
The similarity of a pair is the cosine of the attention-masked mean of the encoder's last hidden
states (all-MiniLM-L6-v2's own sentence embedding: mean pooling; normalisation does not change a
cosine). The probe compares the scores of a trained model with those of the pretrained one:

- ``spearman_vs_pretrained``: Spearman rank correlation between the two lists of 30 scores
  (1.0: the ranking of the pairs is untouched);
- ``mean_abs_change``: mean ``|sim_after - sim_before|`` over the pairs;
- ``spearman_vs_grades``: Spearman correlation with the hand grades (for the pretrained model, a
  check that the probe measures something the encoder knows).

The encoder runs *inside* the trained LightningModule (``pl_module(x)``, eval mode, no grad) and
its output is taken with a forward hook on the Hugging Face base model (``net.model.bert`` for a
``ContinualClassifier("hf:...")``). So every adaptation the method leaves in the model is what is
probed: merged LoRA / PEGO weights, LoRAMoE's routed experts (the routers see each probe sentence),
L2M's modulation pool (each probe sentence selects its pool entry from its own frozen embedding
query, exactly as at test time: plain cosine, no count penalty, no task id).

    python examples/knowledge_probe.py   # prints the pretrained model's scores and its Spearman vs the grades
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (sentence a, sentence b, hand grade 0..4): 4 paraphrase, 3 same event / close meaning, 2 same topic,
#: 1 loosely related (shared words or domain), 0 unrelated
PAIRS: tuple[tuple[str, str, int], ...] = (
    ("A man is playing a guitar on stage.", "A musician performs with his guitar in front of an audience.", 4),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", 4),
    ("The company reported higher profits this quarter.", "Quarterly earnings at the firm went up.", 4),
    ("How do I reset my password?", "What are the steps to change a forgotten password?", 4),
    ("The train was delayed because of snow.", "Heavy snowfall caused the train to arrive late.", 4),
    ("She bought a new car yesterday.", "Yesterday she purchased a brand-new automobile.", 4),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass in a park.", 3),
    ("The stock market fell sharply on Monday.", "Shares dropped across the board at the start of the week.", 3),
    ("A woman is slicing tomatoes in the kitchen.", "Someone is preparing vegetables for dinner.", 3),
    ("The patient was given antibiotics for the infection.", "Doctors treated the bacterial infection with drugs.",
     3),
    ("The team won the championship after extra time.", "They lifted the trophy following a dramatic final.", 3),
    ("The new phone has an excellent camera.", "Photos taken with this smartphone look great.", 3),
    ("The restaurant serves delicious Italian pasta.", "I had a great pizza at a small place downtown.", 2),
    ("Scientists discovered a new species of frog.", "Biologists study the habitats of amphibians.", 2),
    ("The senator proposed a new tax bill.", "Parliament debated the budget for next year.", 2),
    ("He is learning to play the piano.", "The orchestra performed a symphony last night.", 2),
    ("The hotel room was clean and quiet.", "The airline lost my luggage on the way to the resort.", 2),
    ("Rain is expected throughout the weekend.", "The forecast says it will be sunny tomorrow.", 2),
    ("The bank raised interest rates again.", "We sat on the river bank and watched the boats.", 1),
    ("This laptop battery lasts all day.", "The battery of soldiers advanced at dawn.", 1),
    ("The museum opened a new dinosaur exhibit.", "My grandfather collects old coins.", 1),
    ("She runs five kilometres every morning.", "The software runs on every operating system.", 1),
    ("The book was too long and boring.", "The movie had amazing special effects.", 1),
    ("A dog is chasing a frisbee on the beach.", "A cat is sitting on a windowsill.", 1),
    ("The volcano erupted and covered the town in ash.", "I prefer my coffee with milk and no sugar.", 0),
    ("The quarterly report is due on Friday.", "Penguins live in the southern hemisphere.", 0),
    ("He fixed the leaking pipe under the sink.", "The poem describes a lonely autumn evening.", 0),
    ("The spacecraft landed safely on Mars.", "Please pass the salt.", 0),
    ("Our neighbours are painting their fence blue.", "The algorithm sorts the list in linear time.", 0),
    ("The violinist tuned her instrument before the concert.", "Tax returns must be filed by April.", 0),
)


def encode_pairs(tokenizer: Any, max_length: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token ids ``(len(PAIRS), max_length)`` of the first and of the second sentences, padded with
    ``pad_token_id`` (the layout of the text stream's samples)."""
    from datamodules.text import tokenize

    if tokenizer.pad_token_id != pad_token_id:
        raise ValueError(f"the tokenizer pads with {tokenizer.pad_token_id}, the model with {pad_token_id}")
    a = tokenize(tokenizer, [p[0] for p in PAIRS], max_length)
    b = tokenize(tokenizer, [p[1] for p in PAIRS], max_length)
    return a, b


def find_encoder(model: nn.Module) -> nn.Module:
    """The Hugging Face base model (e.g. ``BertModel``) inside a ``ContinualClassifier("hf:...")``."""
    for module in model.modules():
        base = getattr(module, "base_model", None)
        if isinstance(base, nn.Module) and base is not module and hasattr(module, "config"):
            return base
    raise ValueError(
        f"no Hugging Face model with a base_model inside {type(model).__name__}: the probe needs a "
        "ContinualClassifier('hf:<path>') (or any module holding a transformers PreTrainedModel)"
    )


@torch.no_grad()
def sentence_embeddings(model: nn.Module, ids: Tensor, pad_token_id: int, batch_size: int = 32) -> Tensor:
    """Attention-masked mean of the encoder's last hidden states, computed by running ``model(ids)``
    (so every adaptation in ``model`` applies) and hooking its Hugging Face base model."""
    encoder = find_encoder(model)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    modes = {m: m.training for m in model.modules()}
    handle = encoder.register_forward_hook(hook)
    device = next(model.parameters()).device
    out = []
    try:
        model.eval()
        for i in range(0, len(ids), batch_size):
            x = ids[i : i + batch_size].to(device)
            captured.clear()
            model(x)
            if len(captured) != 1:
                raise RuntimeError(f"the encoder ran {len(captured)} times in one forward; expected once")
            mask = (x != pad_token_id).unsqueeze(-1).float()
            hidden = captured[0].float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    finally:
        handle.remove()
        for m, flag in modes.items():
            m.training = flag
    return torch.cat(out).cpu()


def pair_similarities(model: nn.Module, a: Tensor, b: Tensor, pad_token_id: int) -> list[float]:
    """Cosine similarity of each pair's mean-pooled sentence embeddings."""
    ea = sentence_embeddings(model, a, pad_token_id)
    eb = sentence_embeddings(model, b, pad_token_id)
    return torch.nn.functional.cosine_similarity(ea, eb, dim=-1).tolist()


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    rho = spearmanr(list(x), list(y)).statistic
    return float(rho)


def compare(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """``spearman_vs_pretrained``, ``mean_abs_change``, ``spearman_vs_grades`` and the mean similarity."""
    grades = [p[2] for p in PAIRS]
    return {
        "spearman_vs_pretrained": spearman(before, after),
        "mean_abs_change": sum(abs(u - v) for u, v in zip(before, after)) / len(before),
        "spearman_vs_grades": spearman(grades, after),
        "mean_similarity": sum(after) / len(after),
    }


def l2m_selected_entries(model: nn.Module, run: Callable[[], Any]) -> list[int]:
    """Pool entries that the probe sentences select while ``run()`` probes an L2M-modulated model
    (top-1 index of each sentence, in order); empty for a model without an L2M pool."""
    from cl_plugins.peft.l2m import ModulationPool

    pools = [m for m in model.modules() if isinstance(m, ModulationPool)]
    if not pools:
        run()
        return []
    pool = pools[0]
    seen: list[Tensor] = []
    original = pool.select

    def select(query: Tensor) -> Tensor:
        idx = original(query)
        seen.append(idx[:, 0].detach().cpu())
        return idx

    pool.select = select  # type: ignore[method-assign]
    try:
        run()
    finally:
        del pool.select
    return torch.cat(seen).tolist() if seen else []


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cl_plugins import ContinualClassifier
    from datamodules.text import default_tokenizer_path, load_tokenizer

    path = default_tokenizer_path()
    tok = load_tokenizer(path)
    model = ContinualClassifier(f"hf:{path}", num_classes=2)
    a, b = encode_pairs(tok, 64, int(tok.pad_token_id))
    sims = pair_similarities(model, a, b, int(tok.pad_token_id))
    for (s1, s2, g), s in zip(PAIRS, sims):
        print(f"{s:6.3f}  grade {g}  {s1} | {s2}")
    rho = spearman([p[2] for p in PAIRS], sims)
    mean = sum(sims) / len(sims)
    print(f"pretrained all-MiniLM-L6-v2: Spearman vs hand grades {rho:.3f}, mean similarity {mean:.3f}")
    if math.isnan(rho):
        raise RuntimeError("Spearman is NaN: the similarities are constant")


if __name__ == "__main__":
    main()
