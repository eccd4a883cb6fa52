import torch
from lightq.quant import schemes as S
g = torch.Generator("cuda").manual_seed(0)
w = torch.randn(1536, 8960, device="cuda", generator=g)
for scheme in ("fp8", "int8"):
    a, b = S.quantize_weight(w, scheme), S.quantize_weight(w.cpu(), scheme)
    print(scheme, "scale equal", torch.equal(a.scale.cpu(), b.scale))
    qmax = 448.0 if scheme == "fp8" else 127.0
    sc = b.scale
    dg = (w / a.scale).cpu(); dc = w.cpu() / sc
    print(" div equal", torch.equal(dg, dc), (dg != dc).sum().item())
    d = (a.data.cpu().view(torch.uint8) != b.data.view(torch.uint8))
    print(" code diffs", d.sum().item())
    if d.any():
        i = d.nonzero()[:3]
        for r, c in i.tolist():
            print("  ", w[r, c].item(), dg[r, c].item(), dc[r, c].item(), a.data[r, c].float().item(), b.data[r, c].float().item())
