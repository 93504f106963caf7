"""A timeline plot of an offloaded run: expert loads (link) and computations per MoE layer."""
from __future__ import annotations


def plot_timeline(events, path: str, title: str = "") -> None:
    """events: (kind "load" | "prefetch" | "fill" | "compute" | "host", (stack, layer, expert), start s,
    end s) -> PNG at `path` (a prefetch is a load on the link, hatched; a fill, a load behind a
    host computation, dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({key[:2] for _, key, _, _ in events})
    colour = {layer: plt.cm.tab20(i % 20) for i, layer in enumerate(layers)}
    lanes = {"load": 1, "prefetch": 1, "fill": 1, "compute": 0, "host": 2}
    hatch = {"prefetch": "//", "fill": ".."}
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for kind, key, start, end in events:
        ax.broken_barh([(start, max(end - start, 1e-6))], (lanes[kind] - 0.4, 0.8), facecolors=colour[key[:2]],
                       edgecolor="black", linewidth=0.2, hatch=hatch.get(kind))
    ax.set_yticks([0, 1, 2], ["compute", "link", "host"])
    ax.set_xlabel("seconds")
    ax.set_title(title or "expert loads and computations (colour: MoE layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
