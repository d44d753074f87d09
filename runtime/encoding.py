"""The encoding behind evaluate.py: mteb's F2LLM protocol through packed rows, on every rank.

mteb's F2LLM loader (a SentenceTransformer) calls `model.encode(texts, prompt=instruction,
**kwargs)`; evaluate.py replaces that one method with `SplitEncode(PackedEncode(st))` (or
`SplitEncode(LoaderEncode(st))` for the loader's own padded encode):

- Both start from the loader's own preprocessing (`SentenceTransformer.preprocess`: the prompt
  prepended, the tokenizer's EOS appended after truncation to max_seq_length) and cut an
  encode call's texts into units of work by a fixed rule: `PackedEncode` into the packed
  chunks of model.encode (first fit, longest first, at most `chunk_tokens` tokens), embedded
  by the backbone with last-token pooling and L2 norm as the loader's Pooling and Normalize,
  no padding computed; `LoaderEncode` into the loader's own batches (longest first).
- `SplitEncode` hands the units to the ranks of torchrun, longest first, each to the rank
  with the fewest tokens so far (`split_by_tokens`), and gathers the vectors back into the
  input order. A unit is embedded the same way whichever rank runs it, so 1 and N processes
  give the same vectors. Only rank 0 runs mteb (and scores); the others `serve`: they embed
  the units rank 0 sends (gloo, host memory) until it says DONE.
Importing this file does nothing.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import model as M

DONE = None  # what rank 0 sends when mteb has finished: the other ranks return


@dataclass
class Unit:
    rows: list[int]  # the positions of its texts in the encode call
    payload: list  # what `embed` takes: id lists (packed) or texts (loader)
    tokens: int  # the work it is, for the split


class PackedEncode:
    """The loader's encode through packed rows: same ids, same pooled state (the EOS), fp32
    unit vectors, sentence-transformers' truncate_dim (after Normalize, as it does)."""

    def __init__(self, st, chunk_tokens: int = 16384):
        self.st, self.chunk_tokens = st, chunk_tokens
        self.backbone = st[0].auto_model  # the loader's own weights (bf16 on CUDA by default)

    def units(self, sentences: list[str], prompt: str | None = None, **kwargs) -> list[Unit]:
        ids = token_ids(self.st, sentences, prompt)
        lengths = [len(x) for x in ids]
        width = M.row_width(self.backbone, ids) if ids else None
        return [Unit(c, [ids[i] for i in c], sum(lengths[i] for i in c))
                for c in M.make_chunks(lengths, self.chunk_tokens, 0, width)]

    def embed(self, payload: list[list[int]], **kwargs) -> np.ndarray:
        out = M.encode_ids(self.backbone, payload, chunk_tokens=self.chunk_tokens)  # (n, D)
        return (out[:, :self.st.truncate_dim] if self.st.truncate_dim else out).numpy()


class LoaderEncode:
    """The loader's own SentenceTransformer.encode, on units of its own batches."""

    def __init__(self, st):
        self.st, self.encode = st, st.encode

    def units(self, sentences: list[str], prompt: str | None = None, batch_size: int = 32,
              **kwargs) -> list[Unit]:
        lengths = [len(x) for x in token_ids(self.st, sentences, prompt)]
        order = sorted(range(len(sentences)), key=lambda i: (-lengths[i], i))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        return [Unit(b, [sentences[i] for i in b], len(b) * lengths[b[0]]) for b in batches]

    def embed(self, payload: list[str], **kwargs) -> np.ndarray:
        kwargs = dict(kwargs, convert_to_tensor=False, convert_to_numpy=True)
        return np.asarray(self.encode(payload, **kwargs), dtype=np.float32)


def token_ids(st, texts: list[str], prompt: str | None = None) -> list[list[int]]:
    """The ids the loader's encode would run, from its own preprocess, padding dropped."""
    ids = []
    for start in range(0, len(texts), 1024):  # padded to the longest: a slice at a time
        batch = st.preprocess(texts[start:start + 1024], prompt=prompt)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            ids.append(row[mask.bool()].tolist())  # either padding side
    return ids


def split_by_tokens(tokens: list[int], world: int) -> list[list[int]]:
    """Unit indices -> one list per rank: longest first, each unit to the rank with the fewest
    tokens so far (ties: the lowest rank). The same units -> the same split."""
    shares, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += tokens[i]
    return shares


class SplitEncode:
    """Rank 0's encode: cut into units, send each rank its share, embed its own, gather,
    reorder. One process embeds every unit itself, the same way."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @torch.no_grad()
    def __call__(self, sentences, convert_to_tensor: bool = False, **kwargs):
        sentences = list(sentences)
        units = self.encoder.units(sentences, **kwargs)
        shares = split_by_tokens([u.tokens for u in units], self.world)
        if self.world > 1:
            received = [None]
            dist.scatter_object_list(received, [([units[i].payload for i in share], kwargs)
                                                for share in shares], src=0)
        mine = embed_share(self.encoder, ([units[i].payload for i in shares[0]], kwargs))
        gathered = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            dist.gather_object(mine, gathered, dst=0)
        dim = next((e[0].shape[1] for e in gathered if e), 0)
        out = np.zeros((len(sentences), dim), dtype=np.float32)
        for share, embedded in zip(shares, gathered):
            for i, emb in zip(share, embedded):
                out[units[i].rows] = emb  # (len(rows), D) back to the input order
        return torch.from_numpy(out) if convert_to_tensor else out

    def finish(self) -> None:
        """Tell the other ranks that mteb is done (they return from `serve`); the barrier lets
        every rank close the process group after the last message, none before."""
        if self.world > 1:
            dist.scatter_object_list([None], [DONE] * self.world, src=0)
            dist.barrier()


def embed_share(encoder, request) -> list[np.ndarray]:
    """(payloads, encode kwargs) -> one (n_unit, D) float32 array per unit."""
    payloads, kwargs = request
    return [encoder.embed(p, **kwargs) for p in payloads]


@torch.no_grad()
def serve(encoder) -> int:
    """Every rank but 0: embed the units rank 0 sends until it says DONE. -> units embedded."""
    units = 0
    while True:
        received = [None]
        dist.scatter_object_list(received, None, src=0)
        if received[0] is DONE:
            dist.barrier()
            return units
        mine = embed_share(encoder, received[0])
        units += len(mine)
        dist.gather_object(mine, None, dst=0)
