"""The demo: a model's detections drawn by detectron2's Visualizer on images, a video or a webcam.

`tools/demo.py` takes detectron2's demo flags; this module holds what it runs.
"""
import os
from typing import Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer
import tqdm

from .errors import InputError
from .safe_io import atomic_path
from .visualization.predictions import ModelRunner, read_image, write_image

__all__ = ["Demo", "output_path"]


def output_path(output: str, input_path: str, several: bool) -> str:
    """Where the picture of `input_path` goes: into the folder `output` when there are several inputs or
    `output` is a folder, else `output` itself."""
    if several or os.path.isdir(output):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(input_path))
    return output


class Demo:
    """Runs a config's model (`ModelRunner`, a DefaultPredictor) and draws its detections above
    `confidence_threshold` with the test dataset's class names."""

    def __init__(self, cfg, confidence_threshold: float = 0.5):
        self.predictor = ModelRunner(cfg)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
        self.confidence_threshold = confidence_threshold

    def detections(self, image_bgr: np.ndarray) -> Instances:
        """Detections (on the CPU) of an HxWx3 BGR image above the threshold."""
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]

    def run_on_image(self, path: str) -> Tuple[Instances, np.ndarray]:
        """(detections, RGB picture) of the image file at `path`."""
        image = read_image(path, "BGR")
        instances = self.detections(image)
        picture = Visualizer(image[:, :, ::-1], self.metadata).draw_instance_predictions(instances)
        return instances, picture.get_image()

    def run_on_video(self, capture: cv2.VideoCapture, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
        """BGR frames of a video with their detections drawn (VideoVisualizer keeps colours per object)."""
        visualizer = VideoVisualizer(self.metadata)
        count = 0
        while capture.isOpened() and (max_frames is None or count < max_frames):
            ok, frame = capture.read()
            if not ok:
                break
            picture = visualizer.draw_instance_predictions(frame[:, :, ::-1], self.detections(frame))
            count += 1
            yield picture.get_image()[:, :, ::-1]

    def write_images(self, paths: List[str], output: Optional[str]) -> List[Tuple[str, int]]:
        """Draw each image (to `output`, a file or a folder); [(input path, number of detections)]."""
        done = []
        for path in tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"):
            instances, picture = self.run_on_image(path)
            if output:
                write_image(output_path(output, path, len(paths) > 1), picture)
            done.append((path, len(instances)))
        return done

    def write_video(self, source: Union[str, int], output: str, max_frames: Optional[int] = None) -> int:
        """Draw the frames of `source` (a video file, or a camera index) into the video `output`
        (mp4v codec); the number of frames written."""
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            what = f"camera {source}" if isinstance(source, int) else f"video {source}"
            raise InputError(f"cannot open the {what} with OpenCV")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        frames = 0
        with atomic_path(output, suffix=".mp4") as tmp:  # a complete video, or none
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            try:
                if not writer.isOpened():
                    raise InputError(f"{output}: OpenCV cannot write an mp4v video here")
                for frame in tqdm.tqdm(self.run_on_video(capture, max_frames), total=max_frames or total,
                                       desc="frames"):
                    writer.write(frame)
                    frames += 1
            finally:
                writer.release()
                capture.release()
        return frames
