"""`fmbseg app`: a web page to try the trained model and to review Stage 1's pseudo labels (Gradio).

Two tabs:

- **Try the model**: upload an image (or pick one of the store's), type class names or pick a
  shipped vocabulary, toggle SAM refinement, name the model (a checkpoint path, ``runs:/<run_id>``,
  ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, resolved by
  ``model_registry.resolve_model_uri`` as ``fmbseg predict`` resolves it). The one Stage 2 segmenter
  (``components.segmenter.Segmenter``) segments it; the page shows the overlay, a legend with each
  class's pixel share and score, and the label PNG to download. An upload that is not an image, or
  has more pixels than ``--max-pixels``, is refused with a message (``components.tryout``).
- **Review pseudo labels**: the store's images worst first by the agreement of the two Stage 1
  variants (``components.review``), each with both variants' maps over it and its detected classes.

The page binds 127.0.0.1 unless ``--host`` says otherwise. Gradio is imported only by this command,
and only after the arguments are checked: a missing library, store or model is one line on stderr
and exit 2.
"""

from __future__ import annotations

import html
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import typer

from flows.common import PARAMS_FILE

__all__ = ["INSTALL_HINT", "ModelCache", "build_page", "register"]

INSTALL_HINT = "pip install 'fmbseg[app]'"
TYPED = "(the class names typed above)"
MAX_UPLOAD_BYTES = "50mb"  # Gradio refuses bigger uploads before they reach us
REVIEW_PANEL_HEIGHT = 360
PICK_LIMIT = 500  # the store's images offered for picking: the worst ones (a dropdown of 100k would not load)
CACHE_HOURS = 24  # Gradio's copies of uploads and results older than this are deleted

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class ModelCache:
    """The segmenter of a model reference, built on first use and kept while the checkpoint's bytes
    stay the same (one at a time: the models are large)."""

    def __init__(self, params: Any, default: str | None) -> None:
        self.params = params
        self.default = default
        self._lock = threading.Lock()
        self._key: str | None = None
        self._segmenter: Any = None

    def get(self, reference: str | None) -> tuple[Any, Path]:
        """(segmenter, checkpoint path) of a model reference ('' or None: the command's --model, else
        what ``fmbseg predict`` uses by default). Raises ValueError / FileNotFoundError for the user."""
        from components.io import file_sha256
        from components.models import resolve_device
        from components.segmenter import Segmenter
        from flows.model_registry import resolve_model_uri

        checkpoint = resolve_model_uri((reference or "").strip() or self.default, self.params)
        key = file_sha256(checkpoint)  # a runs:/ URI downloads its checkpoint again on every call
        with self._lock:
            if key != self._key:
                device = resolve_device(self.params.models.device)
                dtype = self.params.models.dtype if device.type == "cuda" else "fp32"  # the CPU runs fp32
                self._segmenter = Segmenter.from_checkpoint(checkpoint, device=str(device), dtype=dtype,
                                                            weights_dir=self.params.models.weights_dir)
                self._key = key
            return self._segmenter, checkpoint


def _legend_html(rows: list[dict[str, Any]]) -> str:
    """The legend as an HTML table (the browser test reads it back)."""
    body = "".join(
        f'<tr class="legend-row" data-class="{html.escape(r["name"])}">'
        f'<td><span style="display:inline-block;width:14px;height:14px;background:{r["colour"]};'
        f'border:1px solid #000"></span></td><td class="name">{html.escape(r["name"])}</td>'
        f'<td class="share">{100 * r["share"]:.1f}%</td><td class="score">{r["score"]:.3f}</td></tr>'
        for r in rows)
    return ('<table id="legend-table"><thead><tr><th></th><th>class</th><th>pixel share</th>'
            f'<th>score (mean cosine)</th></tr></thead><tbody>{body}</tbody></table>')


def _detections_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p id="detections-none">Stage 1 detected no class in this image.</p>'
    body = "".join(
        f'<tr class="detection-row"><td class="name">{html.escape(r["class_name"])}</td>'
        f'<td>{r["crops_won"]}</td><td>{r["sam_score"]:.3f}</td><td>{100 * r["mask_area_frac"]:.1f}%</td></tr>'
        for r in rows)
    return ('<table id="detections-table"><thead><tr><th>detected class</th><th>CLIP crops won</th>'
            f'<th>SAM predicted IoU</th><th>Stage 1.1 mask area</th></tr></thead><tbody>{body}</tbody></table>')


def build_page(params: Any, *, model: str | None, store: str | None, max_pixels: int) -> Any:
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    from components.datasets.readers import UnreadableImageError
    from components.datasets.registry import display_name
    from components.io import encode_label_png
    from components.labelling.store import PseudoLabels
    from components.overlay import overlay_picture
    from components.review import image_detections, read_store_image, review_order, review_picture
    from components.tryout import legend_rows, read_upload
    from flows.common import class_lines

    models = ModelCache(params, model)
    labels = PseudoLabels(store) if store else None
    order = review_order(labels) if labels is not None else []
    downloads = Path(tempfile.mkdtemp(prefix="fmbseg-app-"))

    def segment(upload: str | None, picked: str | None, typed: str, vocabulary: str, refine: bool,
                reference: str) -> tuple[Any, str, str | None, str]:
        path = upload or picked
        try:
            if not path:
                raise ValueError("upload an image or pick one")
            image = read_upload(path, max_pixels=max_pixels)
            if vocabulary == TYPED and not typed.strip():
                raise ValueError("type the class names or pick a vocabulary")
            classes = class_lines(typed, None) if vocabulary == TYPED else class_lines(None, vocabulary)
            segmenter, checkpoint = models.get(reference)
            result = segmenter.segment(image, classes, refine=refine)
        except UnreadableImageError as err:
            return None, "", None, f"**Rejected:** {Path(path).name}: {err.reason}"
        except (ValueError, FileNotFoundError) as err:
            return None, "", None, f"**Rejected:** {err}"
        picture = overlay_picture(image, None, {"refined" if refine else "base": result.label_map},
                                  [display_name(line) for line in classes])
        label_path = downloads / f"{Path(path).stem}_label.png"
        label_path.write_bytes(encode_label_png(result.label_map, palette=True))
        status = (f"**{len(result.present)} of {len(classes)} classes** in {image.shape[1]} x {image.shape[0]} "
                  f"pixels ({'SAM-refined' if refine else 'base'} map) by `{checkpoint}`")
        return picture, _legend_html(legend_rows(result, classes)), str(label_path), status

    def show_review(position: float) -> tuple[Any, str, str]:
        if not order:
            return None, "No Stage 1 store: start the page with `--store data/pseudo/stage1`.", ""
        k = min(max(int(position), 1), len(order)) - 1
        item = order[k]
        picture = review_picture(labels, item.image_id, read_store_image(item.image_path),
                                 panel_height=REVIEW_PANEL_HEIGHT)
        heading = (f'<p id="review-heading">image <b>{k + 1}</b> of {len(order)}: '
                   f'<b class="image-id">{html.escape(item.image_id)}</b>, confidence '
                   f'<b class="confidence">{item.confidence:.3f}</b> ({html.escape(item.image_path)})</p>')
        return picture, heading, _detections_html(image_detections(labels, item.image_id))

    def step(position: float, delta: int) -> int:
        return min(max(int(position) + delta, 1), max(len(order), 1))

    with gr.Blocks(title="fmbseg", delete_cache=(3600, 3600 * CACHE_HOURS)) as page:
        gr.Markdown("# fmbseg: open-vocabulary segmentation from foundation models")
        _try_tab(gr, order, model, segment)
        _review_tab(gr, page, order, show_review, step)
    return page


def _try_tab(gr: Any, order: list[Any], model: str | None, segment: Any) -> None:
    """The "try the model" tab: an image, class names or a vocabulary, refinement and a model in;
    the overlay, its legend, the label PNG and a status line out (``segment`` computes them)."""
    from components.datasets.registry import CLASS_FILES

    with gr.Tab("Try the model", id="try"):
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image (PNG, JPEG, ...)", type="filepath", elem_id="upload")
                choices = [(Path(item.image_path).name, item.image_path) for item in order[:PICK_LIMIT]]
                picked = gr.Dropdown(choices, value=None, elem_id="pick",
                                     label=f"or pick one of the store's images (the {PICK_LIMIT} least confident)")
                typed = gr.Textbox(label='class names, comma-separated ("sky, grass, car")', elem_id="classes")
                vocabulary = gr.Dropdown([TYPED, *CLASS_FILES], value=TYPED, label="vocabulary",
                                         elem_id="vocabulary")
                refine = gr.Checkbox(label="SAM refinement", value=False, elem_id="refine")
                reference = gr.Textbox(value=model or "", elem_id="model",
                                       label="model: checkpoint path, runs:/<run_id>, models:/<name>@<alias> "
                                             "or models:/<name>/<version> (empty: the default)")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                overlay = gr.Image(label="overlay", type="pil", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                label_png = gr.File(label="label PNG (class index per pixel, 255 = no class; 16-bit with 65535 past 255 classes)",
                                    interactive=False, elem_id="label-png")
        run.click(segment, [upload, picked, typed, vocabulary, refine, reference],
                  [overlay, legend, label_png, status])


def _review_tab(gr: Any, page: Any, order: list[Any], show_review: Any, step: Any) -> None:
    """The "review pseudo labels" tab: the store's images worst first, one at a time
    (``show_review`` draws one, ``step`` moves the position)."""
    with gr.Tab("Review pseudo labels", id="review"):
        gr.Markdown("Worst first: confidence = the share of the pixels labelled by both Stage 1.1 and "
                    "Stage 1.2 on which they agree.")
        with gr.Row():
            previous = gr.Button("◀ previous", elem_id="previous")
            position = gr.Slider(1, max(len(order), 1), value=1, step=1, label="image", elem_id="position")
            following = gr.Button("next ▶", elem_id="next")
        heading = gr.HTML(elem_id="review-info")
        stage1 = gr.Image(label="image | Stage 1.1 | Stage 1.2", type="pil", format="png", interactive=False,
                          elem_id="stage1")
        detections = gr.HTML(elem_id="detections")
        previous.click(lambda p: step(p, -1), position, position)
        following.click(lambda p: step(p, +1), position, position)
        position.change(show_review, position, [stage1, heading, detections])
        page.load(show_review, position, [stage1, heading, detections])


def _user_error(message: str) -> typer.Exit:
    """Exit 2 after one line on stderr."""
    typer.echo(f"fmbseg app: {message}", err=True)
    return typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command("app")
    def app_cmd(
        model: str = typer.Option(None, "--model",
                                  show_default="the registered champion, else ${paths.checkpoint}",
                                  help="checkpoint path, runs:/<run_id> or models:/<name>@<alias>; the page can switch"),
        store: str = typer.Option(None, "--store", show_default="${paths.stage1} when it exists",
                                  help="Stage 1 store to review"),
        port: int = typer.Option(7860, "--port", help="port to serve on"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0: every interface)"),
        max_pixels: int = typer.Option(None, "--max-pixels",
                                       show_default="40 million", help="largest upload decoded, in pixels; bigger ones are refused"),
        params: Path = typer.Option(Path(PARAMS_FILE), help="settings file (device, dtype, weights folder, paths)"),
    ) -> None:
        """A web page to try the model on an image and to review Stage 1's pseudo labels."""
        from flows.common import stage_params

        try:
            if not 0 <= port <= 65535:
                raise ValueError(f"--port must be in 0..65535, got {port}")
            if max_pixels is not None and max_pixels < 1:
                raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
        except ValueError as err:
            raise _user_error(str(err)) from None
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise _user_error(f"the web page needs Gradio: {INSTALL_HINT}") from None
        from components.tryout import DEFAULT_MAX_PIXELS

        try:
            settings = stage_params(params)
            if store is None and Path(settings.paths.stage1).is_dir():
                store = settings.paths.stage1
            if store is not None:
                from components.labelling.store import PseudoLabels

                PseudoLabels(store)
            if model is not None:
                from flows.model_registry import resolve_model_uri

                resolve_model_uri(model, settings)
        except (FileNotFoundError, ValueError) as err:
            raise _user_error(str(err)) from None
        page = build_page(settings, model=model, store=store,
                          max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        import gradio as gr

        page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, quiet=False,
            theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]),
        )
