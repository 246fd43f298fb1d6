"""Prompt encoding: A1111 emphasis syntax, 75-token chunks for long prompts, several text encoders.

    encode_prompts(tokenizer, encoders, ["a (red:1.3) apple"], [""]) -> PromptEncoding(context, pooled, ...)

Emphasis (AUTOMATIC1111's syntax): ``(text)`` x1.1, ``((text))`` x1.21, ``[text]`` /1.1, ``(text:1.5)`` x1.5,
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` literal characters, an unclosed bracket reaches the end of the prompt, and
``BREAK`` (upper case, a word of its own) starts a new chunk.

Long prompts: the tokens are cut into chunks of 75 (BREAK also ends a chunk); each chunk is wrapped like a plain
prompt, [start] + tokens + [end] + padding = 77 ids, encoded on its own, and the chunks are concatenated along the
sequence: context (B, 77k, D). A1111 additionally moves a chunk boundary back to the last comma within 20 tokens;
we cut at exactly 75. A1111 also pads a short chunk before appending the end token; we keep the plain layout
([start] tokens [end] pad) so that a prompt without emphasis that fits one chunk gives exactly the plain 77-token
encoding (diffusers parity); with CLIP-L's pad id 49407 the two layouts are identical anyway.

Textual-inversion embeddings (adapters/embeddings.py), A1111's rule (``sd_hijack_clip.py::tokenize_line``): the
name's BPE ids are looked for in each run's ids (longest name first), so ``name,`` and ``(name:1.2)`` match and
case does not matter; a match becomes n placeholder ids carrying the run's weight, counted by the chunking like
any token and never split over two chunks, and each encoder's token embeddings at those positions are
overwritten by the embedding's vectors for that encoder. Nothing is added to the tokenizer.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from latentdiff.models.text import Tokenizer

if TYPE_CHECKING:
    from latentdiff.adapters.embeddings import Embedding

CHUNK = 75  # prompt tokens per 77-token chunk
PLACEHOLDER = 0  # id at an embedding's positions (A1111's too); its token embedding is overwritten
BREAK = ("BREAK", -1.0)  # chunk-break marker in parse_prompt_attention's output

# one lexical item per match: escapes, brackets, an explicit weight that closes a round bracket, plain text
_ITEM = re.compile(r"""
    \\(?P<escaped>[()\[\]\\])               # \( \) \[ \] \\  -> the literal character
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ":1.3)" closes a round bracket with weight 1.3
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|[:\\])
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs by A1111's emphasis syntax; ``("BREAK", -1.0)`` marks a chunk break.

    Weights multiply from the innermost bracket outwards; brackets that are never closed apply to the end of the
    prompt (round ones first), closing brackets without an opening one are plain text. Adjacent runs of equal
    weight merge. A lone backslash is kept literally (A1111 drops it).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight]; BREAK markers are the tuple BREAK itself, never reweighted
    open_round: list[int] = []  # index into runs where each unclosed bracket starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run is not BREAK:
                run[1] *= factor

    for m in _ITEM.finditer(text):
        if m["escaped"]:
            runs.append([m["escaped"], 1.0])
        elif m["open"]:
            (open_round if m["open"] == "(" else open_square).append(len(runs))
        elif m["weight"] and open_round:
            scale(open_round.pop(), float(m["weight"]))
        elif m["close"] == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif m["close"] == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:  # plain text, or a bracket / weight with nothing to close
            for i, part in enumerate(_BREAK.split(m[0])):
                if i:
                    runs.append(BREAK)
                if part:
                    runs.append([part, 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)

    merged: list[tuple[str, float]] = []
    for run in runs:
        if run is not BREAK and merged and merged[-1] != BREAK and merged[-1][1] == run[1]:
            merged[-1] = (merged[-1][0] + run[0], run[1])
        else:
            merged.append(tuple(run))
    return merged or [("", 1.0)]


class Chunk(NamedTuple):
    ids: list[int]  # <= 75 BPE ids, no start / end
    weights: list[float]  # one per id
    # (offset in ids, embedding): its n vectors go at ids[offset: offset + n]; a list while being built
    fixes: list[tuple[int, Embedding]] | tuple = ()


def _embedding_lookup(tokenizer: Tokenizer, embeddings: dict[str, Embedding]
                      ) -> dict[int, list[tuple[list[int], Embedding]]]:
    """First BPE id of each name -> [(the name's ids, embedding)], longest name first (A1111's ids_lookup)."""
    table: dict[int, list[tuple[list[int], Embedding]]] = {}
    for name, emb in embeddings.items():
        ids = tokenizer.encode(name)
        if not ids:
            raise ValueError(f"embedding name {name!r} has no tokens")
        table.setdefault(ids[0], []).append((ids, emb))
    for entries in table.values():
        entries.sort(key=lambda e: -len(e[0]))
    return table


def _match(table: dict, tokens: list[int], i: int) -> tuple[int, Embedding | None]:
    """(ids consumed, embedding) for an embedding name starting at tokens[i], else (1, None)."""
    for ids, emb in table.get(tokens[i], ()):
        if tokens[i: i + len(ids)] == ids:
            return len(ids), emb
    return 1, None


def prompt_chunks(tokenizer: Tokenizer, prompt: str, weighting: str = "a1111",
                  embeddings: dict[str, Embedding] | None = None) -> list[Chunk]:
    """The prompt's tokens cut into chunks of at most 75 (always at least one, possibly empty).

    embeddings: {name: Embedding}; each name found in the prompt takes its n vectors' positions (see above).
    """
    if weighting not in ("a1111", "none"):
        raise ValueError(f"weighting must be 'a1111' or 'none', got {weighting!r}")
    runs = parse_prompt_attention(prompt) if weighting == "a1111" else [(prompt, 1.0)]  # "none": text as typed
    table = _embedding_lookup(tokenizer, embeddings) if embeddings else {}
    chunks: list[Chunk] = []
    cur = Chunk([], [], [])
    for text, weight in runs:
        if (text, weight) == BREAK:
            chunks.append(cur)
            cur = Chunk([], [], [])
            continue
        tokens = tokenizer.encode(text)
        i = 0
        while i < len(tokens):
            used, emb = _match(table, tokens, i) if table else (1, None)
            n = 1 if emb is None else emb.n
            if len(cur.ids) + n > CHUNK:  # an embedding (n <= 75) is never split over two chunks
                chunks.append(cur)
                cur = Chunk([], [], [])
            if emb is None:
                cur.ids.append(tokens[i])
            else:
                cur.fixes.append((len(cur.ids), emb))
                cur.ids.extend([PLACEHOLDER] * n)
            cur.weights.extend([weight] * n)
            i += used
    if cur.ids or not chunks:
        chunks.append(cur)
    return chunks


class PromptEncoding(NamedTuple):
    context: torch.Tensor  # (B, 77k, sum of encoder widths)
    pooled: torch.Tensor | None  # (B, P) from the last encoder with a text projection, else None
    neg_context: torch.Tensor | None  # same shape as context; None without negatives
    neg_pooled: torch.Tensor | None


def _restore_mean(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: z *= w per token, then rescale so each chunk keeps its unweighted mean.

    z (N, 77, W), w (N, 77). The mean is taken per chunk and prompt (A1111 takes it over the whole batch, which
    makes one prompt's result depend on the others in the batch).
    """
    zf = z.float()
    before = zf.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    zf = zf * w[..., None]
    return (zf * (before / zf.mean(dim=(1, 2), keepdim=True))).to(z.dtype)


def _with_embeddings(enc: nn.Module, e: int, ids: torch.Tensor, flat: list[Chunk]) -> torch.Tensor | None:
    """Token embeddings (N, 77, W) of ids with encoder e's embedding vectors written at their positions (after
    the start token); None when no chunk holds an embedding, so plain prompts take the plain lookup."""
    if not any(c.fixes for c in flat):
        return None
    x = enc.embed_tokens(ids)  # (N, 77, W)
    for row, chunk in enumerate(flat):
        for offset, emb in chunk.fixes:
            if len(emb.vectors) <= e or emb.vectors[e].shape[1] != x.shape[-1]:
                raise ValueError(f"embedding {emb.token!r} ({emb.source}) has no vectors of width {x.shape[-1]} "
                                 f"for text encoder {e}; check it with adapters.embeddings.check")
            x[row, 1 + offset: 1 + offset + emb.n] = emb.vectors[e].to(x)  # (n, W)
    return x


def encode_prompts(tokenizer: Tokenizer, encoders: list[nn.Module], prompts: list[str],
                   negative: list[str] | None = None, *, clip_skip: int | None = None,
                   weighting: str = "a1111", embeddings: dict[str, Embedding] | None = None) -> PromptEncoding:
    """Encode prompts (and their negatives) with every text encoder; contexts concatenate along features.

    encoders: CLIPTextEncoder / OpenCLIPTextEncoder modules (each carries its ``cfg``: pad id, layer, norm).
    clip_skip: A1111's meaning, the hidden state ``clip_skip`` layers from the end (1 = last, 2 = penultimate)
        for every encoder, each still through its final norm iff ``cfg.final_norm``; None = each encoder's
        ``cfg.layer_from_end`` (SD1: 1, SD2 / SDXL: 2). diffusers' ``clip_skip=n`` equals ours n+1 for SD1 and
        n+2 for SDXL.
    weighting: "a1111" parses emphasis and applies it by A1111's "multiply, then restore the mean" rule per
        encoder and chunk; "none" encodes the text literally (brackets are tokens, no BREAK).
    embeddings: {name: Embedding} usable by name in prompts and negatives; each holds one vector set per
        encoder, in the order of ``encoders`` (SDXL: clip_l, clip_g). Check them with adapters.embeddings.check.
    Conditional and negative prompts are padded with empty-prompt chunks to the same chunk count; the pooled
    vector (SDXL) comes from each prompt's first chunk.
    """
    if negative is not None and len(negative) != len(prompts):
        raise ValueError(f"negative has {len(negative)} prompts for {len(prompts)} prompts")
    texts = prompts + (negative or [])
    per_text = [prompt_chunks(tokenizer, t, weighting, embeddings) for t in texts]
    k = max(len(c) for c in per_text)
    per_text = [c + [Chunk([], [])] * (k - len(c)) for c in per_text]  # empty-prompt chunks
    flat = [chunk for chunks in per_text for chunk in chunks]  # text-major: text i chunk j at i*k + j
    # start / end / pad tokens keep weight 1; weights beyond 75 tokens never exist (chunks hold <= 75)
    weights = torch.tensor([[1.0, *c.weights, *[1.0] * (CHUNK + 1 - len(c.weights))] for c in flat])  # (N, 77)
    weighted = (weights != 1.0).any(dim=1)  # (N,) chunks that need the emphasis rule

    contexts, pooled = [], None
    for e, enc in enumerate(encoders):
        param = next(enc.parameters())
        ids = torch.tensor([tokenizer.wrap(c.ids, enc.cfg.pad_id, CHUNK + 2) for c in flat], device=param.device)
        z, p = enc(ids, clip_skip, _with_embeddings(enc, e, ids, flat))  # (N, 77, W), (N, P or W)
        if weighted.any():  # unweighted chunks stay bit-identical to a plain encoding
            rows = weighted.nonzero()[:, 0].to(param.device)
            z = z.index_copy(0, rows, _restore_mean(z[rows], weights.to(param.device)[rows]))
        contexts.append(z.reshape(len(texts), k * (CHUNK + 2), -1))  # (T, 77k, W)
        if enc.cfg.projection_dim:
            pooled = p.reshape(len(texts), k, -1)[:, 0]  # (T, P)
    context = torch.cat(contexts, dim=-1)  # (T, 77k, sum W)
    b = len(prompts)
    if negative is None:
        return PromptEncoding(context, pooled, None, None)
    return PromptEncoding(context[:b], None if pooled is None else pooled[:b], context[b:],
                          None if pooled is None else pooled[b:])
