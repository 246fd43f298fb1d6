"""Init file of the shapes model's stage 5: the stage-4 model with the token embeddings of "left" and "right"
pushed apart.

Why (measured on the stage-4 file with the x0 prediction at t=999, 8 seeds): "top ..." and "bottom ..." put the
object 32 px apart, but "... left" and "... right" gave the same image to 0.1 px, the two words' embeddings having
drifted together (cosine 0.42, distance 0.32, norm 0.3) and the encoder's outputs for "top left" / "top right"
differing by 0.5 (norm 9.8). Top / bottom had left that symmetric state on its own only after ~3,500 steps. Here
the two embeddings become their mean +- a seeded random vector of norm 0.6 (output difference 1.7).

What happened (stage-5 checkpoints, raw weights): after 500 steps the encoder had folded the difference back to
0.5 (the embeddings still 1.1 apart); after 1,000 it was 13.9 and "top left" / "top right" put the object 19 px
apart. No control run without the split was made, so whether the split caused the escape is not known.

    python checkpoints/split_left_right.py checkpoints/shapes.safetensors runs/shapes-stage5-init.safetensors
"""
import sys

import torch

import latentdiff

src, out = sys.argv[1], sys.argv[2]
pipe = latentdiff.load(src, dtype=torch.float32)
emb = pipe.text_encoders[0].transformer.text_model.embeddings.token_embedding.weight
left, right = (pipe.tokenizer([w], pad_id=pipe.cfg.text[0].pad_id)[0][1].item() for w in ("left", "right"))
d = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
d *= 0.6 / d.norm()
with torch.no_grad():
    mean = (emb[left] + emb[right]) / 2
    emb[left], emb[right] = mean + d, mean - d
pipe.save(out)
print(f"{out}: 'left' (id {left}) and 'right' (id {right}) now {(emb[left] - emb[right]).norm():.2f} apart")
