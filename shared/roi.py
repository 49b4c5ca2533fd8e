"""RoIAlign [He et al. 2017, Mask R-CNN §3] from tensor primitives, and region features from it.

    roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        input (N, C, H, W), boxes (K, 5) = (batch index, x1, y1, x2, y2) in image pixels
        -> (K, C, ph, pw), the call and the numbers of torchvision.ops.roi_align
    box_features(grid, boxes, image_size) -> (K, C): each box RoIAligned (7 x 7) and average-
        pooled, the one vector per region that Oscar and UNITER read

What RoIAlign computes. Box k is mapped to feature coordinates (times spatial_scale; with
aligned=True minus half a pixel, so that a pixel's centre, not its corner, sits at integer
coordinates) and cut into ph x pw bins. Each bin averages gh x gw sample points spread evenly
inside it (gh = sampling_ratio, or ceil(box height / ph) when sampling_ratio <= 0), and each
sample is the bilinear interpolation of the 4 nearest feature cells (no quantisation anywhere,
unlike RoIPool). torchvision's border rules are kept: a sample more than one cell outside the map
is 0; one within a cell of the border is clamped onto it. With aligned=False a box is at least
one cell wide and high (the Detectron convention before the half-pixel fix).

How it is computed here. The bilinear weight of a sample (y, x) on cell (h, w) is a product
a(y, h) · b(x, w), the border rules are per axis too, and the bin average is an average over
rows times an average over columns. So bin (i, j) of box k is

    out[k, :, i, j] = sum_h sum_w  Ay[k, i, h] · F[b_k, :, h, w] · Ax[k, j, w]

with Ay (K, ph, H) the row weights of bin row i averaged over its gh sample rows (Ax likewise):
two small weight matrices per box and one einsum, instead of K·ph·pw·gh·gw gathers.
`roi_align_loop` is the same definition written one sample at a time, the tests' reference.
"""

import math

import torch
from torch import Tensor


def _axis_weights(start: Tensor, length: Tensor, bins: int, grid: Tensor, size: int) -> Tensor:
    """Per-box interpolation weights along one axis.

    start, length: (K,) the box's first coordinate and extent in feature cells; bins: ph (or pw);
    grid: (K,) samples per bin along this axis; size: H (or W).
    -> (K, bins, size): row i averages the bilinear weights of the grid[k] samples of bin i."""
    G = max(int(grid.max()), 1) if len(grid) else 1  # the largest grid of any box
    bin_size = length / bins  # (K,)
    i = torch.arange(bins, device=start.device, dtype=start.dtype)  # (bins,)
    j = torch.arange(G, device=start.device, dtype=start.dtype)  # (G,)
    g = grid.clamp(min=1).to(start.dtype)  # (K,)
    # sample coordinate: start + i·bin + (j + 0.5)·bin / g           (K, bins, G)
    pos = (start[:, None, None] + i[None, :, None] * bin_size[:, None, None]
           + (j[None, None, :] + 0.5) * (bin_size / g)[:, None, None])
    used = (j[None, None, :] < grid[:, None, None])  # (K, 1, G) only the box's own grid counts
    inside = (pos >= -1.0) & (pos <= size)  # further out than one cell: the sample is 0
    pos = pos.clamp(min=0)  # within a cell of the low border: onto it
    low = pos.floor().clamp(max=size - 1)  # (K, bins, G)
    on_edge = low >= size - 1  # at or past the last cell: that cell alone
    pos = torch.where(on_edge, low, pos)
    high = torch.where(on_edge, low, low + 1)
    frac = pos - low  # weight of `high`; 1 - frac of `low`
    cells = torch.arange(size, device=start.device, dtype=start.dtype)  # (size,)
    w = ((cells == low[..., None]) * (1 - frac)[..., None]
         + (cells == high[..., None]) * frac[..., None])  # (K, bins, G, size)
    w = w * (inside & used)[..., None]
    return w.sum(2) / g[:, None, None]  # (K, bins, size)


def roi_align(input: Tensor, boxes: Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """RoIAlign (module docstring). input (N, C, H, W); boxes (K, 5) float, rows (batch index,
    x1, y1, x2, y2) in input-image pixels; spatial_scale maps them to the feature map (1/32 for
    ResNet C5) -> (K, C, ph, pw). The defaults are torchvision's."""
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) rows of (batch index, x1, y1, x2, y2), got "
                         f"shape {tuple(boxes.shape)}")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    N, C, H, W = input.shape
    dtype = torch.promote_types(input.dtype, torch.float32)  # weights in at least fp32
    boxes = boxes.to(device=input.device, dtype=dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, c] * spatial_scale - offset for c in range(1, 5))  # (K,) each
    width, height = x2 - x1, y2 - y1
    if not aligned:  # the pre-fix convention: at least one cell
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(height, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(width, sampling_ratio, dtype=torch.long)
    else:  # adaptive: about one sample per feature cell
        grid_h, grid_w = torch.ceil(height / ph).long(), torch.ceil(width / pw).long()
    Ay = _axis_weights(y1, height, ph, grid_h, H)  # (K, ph, H)
    Ax = _axis_weights(x1, width, pw, grid_w, W)  # (K, pw, W)
    index = boxes[:, 0].long()  # (K,)
    out = input.new_zeros(len(boxes), C, ph, pw, dtype=dtype)
    for b in index.unique().tolist():  # one einsum per image of the batch
        rows = (index == b).nonzero().squeeze(1)  # (k,)
        out[rows] = torch.einsum("kih,chw,kjw->kcij", Ay[rows], input[b].to(dtype), Ax[rows])
    return out.to(input.dtype)


def roi_align_loop(input: Tensor, boxes: Tensor, output_size: int | tuple[int, int],
                   spatial_scale: float = 1.0, sampling_ratio: int = -1,
                   aligned: bool = False) -> Tensor:
    """The same RoIAlign one sample at a time, straight from the definition (slow; tests)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, C, H, W = input.shape
    out = torch.zeros(len(boxes), C, ph, pw, dtype=torch.float64)
    x = input.double()

    def bilinear(b: int, y: float, xx: float) -> Tensor:
        if y < -1.0 or y > H or xx < -1.0 or xx > W:
            return torch.zeros(C, dtype=torch.float64)
        y, xx = max(y, 0.0), max(xx, 0.0)
        y0, x0 = int(y), int(xx)
        if y0 >= H - 1:
            y0 = y1 = H - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= W - 1:
            x0 = x1 = W - 1
            xx = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, xx - x0
        return ((1 - ly) * (1 - lx) * x[b, :, y0, x0] + (1 - ly) * lx * x[b, :, y0, x1]
                + ly * (1 - lx) * x[b, :, y1, x0] + ly * lx * x[b, :, y1, x1])

    offset = 0.5 if aligned else 0.0
    for k, (b, bx1, by1, bx2, by2) in enumerate(boxes.double().tolist()):
        sx, sy = bx1 * spatial_scale - offset, by1 * spatial_scale - offset
        w, h = bx2 * spatial_scale - offset - sx, by2 * spatial_scale - offset - sy
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
        for i in range(ph):
            for j in range(pw):
                total = torch.zeros(C, dtype=torch.float64)
                for iy in range(gh):
                    for ix in range(gw):
                        y = sy + i * h / ph + (iy + 0.5) * h / ph / gh
                        xx = sx + j * w / pw + (ix + 0.5) * w / pw / gw
                        total += bilinear(int(b), y, xx)
                out[k, :, i, j] = total / max(gh * gw, 1)
    return out


def box_features(grid: Tensor, boxes: list[Tensor], image_size: int,
                 output_size: int = 7) -> list[Tensor]:
    """One feature vector per box: RoIAlign (output_size², aligned, adaptive sampling) on the
    backbone's last grid, then the mean over the bins (the pooled ROI feature detectors hand to
    Oscar and UNITER; 2048-d on ResNet-50 C5).

    grid (B, C, h, w) of images of side image_size; boxes: B tensors (K_b, 4) of x1, y1, x2, y2
    as fractions of the image side -> B tensors (K_b, C)."""
    rows = torch.cat([torch.cat([torch.full((len(b), 1), float(n)), b.float() * image_size], 1)
                      for n, b in enumerate(boxes)])  # (K, 5) in pixels
    pooled = roi_align(grid.float(), rows, output_size, spatial_scale=grid.shape[-1] / image_size,
                       sampling_ratio=-1, aligned=True).mean((2, 3))  # (K, C)
    return list(pooled.split([len(b) for b in boxes]))
