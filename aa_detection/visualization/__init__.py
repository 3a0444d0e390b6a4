"""Pictures of what the detectors do: detections, ground truth, attention maps, model comparisons."""
from .attention import (  # noqa: F401
    AttentionResult, aa_layer_names, attention_grid, attention_to_image, cell_box, colorize, compute_attention,
    find_aa_layer, query_cell,
)
from .predictions import (  # noqa: F401
    InputError, ModelRunner, class_names, draw_boxes, draw_ground_truth, draw_predictions, expand_inputs,
    instances_to_arrays, label_image, read_image, side_by_side, to_rgb, write_image,
)
