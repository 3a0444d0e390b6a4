"""Export a detector for deployment.

- "torchscript": the whole RetinaNet (pre-processing, backbone, head, box decoding and NMS) traced
  through detectron2's `TracingAdapter` at one image size; the trace runs at other sizes. The file
  takes one image (3, H, W) in the config's INPUT.FORMAT and returns the detections' fields named in
  the `.json` written beside it.
- "export": `torch.export` of the backbone (AA-ResNet + FPN) with the image height and width dynamic
  (multiples of the backbone's size divisibility); RetinaNet's post-processing has data-dependent
  shapes that torch.export does not take.
- "onnx": the same backbone through `torch.onnx.export` (input "images", outputs named by feature),
  its attention on the pure-PyTorch `naive` path: the CPU kernel operator has no ONNX form. Needs the
  `onnx` and `onnxscript` packages; `load_onnx` runs the file with onnxruntime.

With the default `MODEL.AA.IMPL` ("auto") the CPU attention runs as the operator
`torch.ops.aa_detection.attention_forward`: load the files after `import aa_detection`.
"""
import json
import os
from typing import Callable, Dict, Optional

from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
import torch

from .checkpoint import AACheckpointer
from .errors import MissingDependencyError
from .safe_io import AtomicWritePathManager, atomic_path, atomic_write

__all__ = ["FORMATS", "export_backbone", "export_model", "export_onnx", "export_torchscript", "load_backbone",
           "load_onnx", "load_torchscript", "output_path", "predict", "sample_image"]

FORMATS = ("torchscript", "export", "onnx")
ONNX_ATTENTION = "naive"  # the attention path exported to ONNX: matmuls and a softmax, exact
FIELDS = ("pred_boxes", "scores", "pred_classes")  # the detection fields predict and load_torchscript return


def _detections(model, image):
    """The traced function: detectron2's RetinaNet on one image, detections at the image's own size."""
    return model([{"image": image}])[0]["instances"]


def predict(model: torch.nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The eager model's detections on one image (3, H, W): {field: tensor} at the image's own size."""
    with torch.no_grad():
        instances = _detections(model, image)
    return {"pred_boxes": instances.pred_boxes.tensor, "scores": instances.scores,
            "pred_classes": instances.pred_classes}


def export_torchscript(model: torch.nn.Module, image: torch.Tensor, path: str) -> str:
    """Trace `model` (eval mode) on `image` (3, H, W) and save it to `path` (and `path`.json)."""
    adapter = TracingAdapter(model.eval(), (image,), _detections)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
    # the flattened Instances: one tensor per field (sorted by name), then the image size
    outputs = list(adapter.outputs_schema.keys) + ["image_size"]
    files = AtomicWritePathManager(PathManager)  # local files atomically, others (s3://...) by their handler
    with files.open(path + ".json", "w") as f:  # first: a model file is never without its output names
        json.dump({"input": "image (3, H, W), pixel values in the config's INPUT.FORMAT", "outputs": outputs}, f)
    with files.open(path, "wb") as f:
        torch.jit.save(traced, f)
    return path


def load_torchscript(path: str) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """A function image (3, H, W) -> {field: tensor} running the saved TorchScript file."""
    with PathManager.open(path + ".json") as f:
        names = json.load(f)["outputs"]
    with PathManager.open(path, "rb") as f:
        traced = torch.jit.load(f)

    def run(image: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = dict(zip(names, traced(image)))
        return {name: outputs[name] for name in FIELDS}

    return run


def _backbone_inputs(model, image):
    """(backbone in eval mode, its input batch (1, 3, H, W) for `image`, dynamic height and width)."""
    backbone = model.backbone.eval()
    divisibility = max(backbone.size_divisibility, 1)
    images = model.preprocess_image([{"image": image}]).tensor
    blocks_h = torch.export.Dim("blocks_h", min=1, max=4096 // divisibility)
    blocks_w = torch.export.Dim("blocks_w", min=1, max=4096 // divisibility)
    return backbone, images, ({2: divisibility * blocks_h, 3: divisibility * blocks_w},)


def export_backbone(model: torch.nn.Module, image: torch.Tensor, path: str) -> str:
    """`torch.export` the backbone with dynamic height and width; saves an ExportedProgram at `path`."""
    backbone, images, dynamic_shapes = _backbone_inputs(model, image)
    with torch.no_grad():
        program = torch.export.export(backbone, (images,), dynamic_shapes=dynamic_shapes)
    with atomic_write(path) as f:
        torch.export.save(program, f)
    return path


def require_onnx() -> None:
    """MissingDependencyError naming the install unless onnx and onnxscript (which torch.onnx.export
    needs) are importable."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                                     "pip install onnx onnxscript") from e


def export_onnx(model: torch.nn.Module, image: torch.Tensor, path: str) -> str:
    """The backbone to ONNX at `path`, one file with its weights, with dynamic height and width (input
    "images", one output per feature, e.g. "p3".."p7"), every AAConv2d on the ONNX_ATTENTION path while
    exporting."""
    from .layers import AAConv2d

    require_onnx()
    backbone, images, dynamic_shapes = _backbone_inputs(model, image)
    layers = [m for m in backbone.modules() if isinstance(m, AAConv2d)]
    impls = [m.impl for m in layers]
    try:
        for layer in layers:
            layer.impl = ONNX_ATTENTION
        with torch.no_grad(), atomic_path(path, suffix=".onnx") as tmp:
            torch.onnx.export(backbone, (images,), tmp, dynamo=True, dynamic_shapes=dynamic_shapes,
                              external_data=False, input_names=["images"], output_names=list(backbone.output_shape()))
    finally:
        for layer, impl in zip(layers, impls):
            layer.impl = impl
    return path


def load_onnx(path: str) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """The ONNX backbone run by onnxruntime: images (B, 3, H, W), as for `load_backbone` -> {feature: tensor}."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = session.run(names, {"images": images.detach().cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}

    return run


def load_backbone(path: str) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """The saved backbone as a module: images (B, 3, H, W), H and W multiples of its size divisibility,
    normalised as the model's `preprocess_image` does -> {feature name: (B, C, H / stride, W / stride)}."""
    return torch.export.load(path).module()


def output_path(output_dir: str, export_format: str) -> str:
    """Where `tools/export_model.py` writes a format in `output_dir`."""
    return os.path.join(output_dir, {"torchscript": "model.ts", "export": "backbone.pt2",
                                     "onnx": "backbone.onnx"}[export_format])


def sample_image(cfg: CfgNode, path: Optional[str] = None) -> torch.Tensor:
    """(3, H, W) image to trace with, resized as the test loader does: `path`, or the first image of
    DATASETS.TEST[0]."""
    if path is None:
        return next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))[0]["image"]
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resize = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def export_model(cfg: CfgNode, output_dir: str, export_format: str = "torchscript",
                 image_path: Optional[str] = None) -> str:
    """Build the model of `cfg`, load MODEL.WEIGHTS and export it in `export_format` into `output_dir`."""
    if export_format not in FORMATS:
        raise ValueError(f"export format {export_format!r}: allowed values are {list(FORMATS)}")
    if export_format == "onnx":
        require_onnx()  # before any model is built
    model = build_model(cfg).eval()
    AACheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    image = sample_image(cfg, image_path)
    PathManager.mkdirs(output_dir)
    path = output_path(output_dir, export_format)
    exporter = {"torchscript": export_torchscript, "export": export_backbone, "onnx": export_onnx}[export_format]
    return exporter(model, image, path)
