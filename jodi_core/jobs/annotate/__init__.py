"""Label a folder of images with Jodi perception and write a dataset in the Joint-1.6M layout.

``python -m jodi_core annotate INPUT OUTPUT [options]``; INPUT is a folder of images (jpg, png, webp; searched
recursively) or a ``metadata.jsonl`` in the Joint-1.6M layout whose missing maps are filled in. OUTPUT receives::

    image/<rel>                                  the input image, copied byte for byte
    annotation_<folder>/<rel>[.jpg]              one JPEG per label (``.jpg`` appended when <rel> is not a JPEG)
    annotation_seg_12colors/<rel>.png            the segmentation, snapped to the 12-colour palette (lossless)
    metadata.jsonl                               image, info.height/width, annotation_<folder> paths,
                                                 source_fingerprint (+ input fields)
    errors.jsonl                                 images that could not be read or were refused, with the reason

Images are read upright (EXIF orientation applied; a turned image's copy is written upright) and in any mode (16-bit,
CMYK, transparency...) as 8-bit RGB; one of more than ``imaging.MAX_IMAGE_PIXELS`` pixels (8192 x 8192) goes to
``errors.jsonl``. Every path read from the input (files of a folder, the ``image`` and ``annotation_*`` values of a
metadata.jsonl) must stay inside its root once symlinks are followed, and every path written inside OUTPUT, or that
image goes to ``errors.jsonl``. Rows and lines of an existing metadata.jsonl that this did not write are kept as they
are.

Results do not depend on how the work is split: each image's noise seed is a hash of its path in the output, and
images are batched by aspect bucket and by the set of maps they need. Work is split into deterministic shards
(position ``i`` of the sorted list goes to rank ``i % world``) for torchrun, or spread by Ray Data
(``--engine ray``) as whole batches that the driver plans from the image headers (:func:`plan_batches`), streamed
through a perception stage of model actors (:class:`RayStage`; a caption stage goes before it).

Nothing is lost or written twice: each file is written to a temporary name and renamed; an image counts as done once
its record is appended to the writer's part file (``.annotate/part-*.jsonl``), after all of its files exist. A run
started again reads the records already there, skips what is complete and redoes the rest, and an image whose source
changed since (size, mtime, then SHA-256: ``source_fingerprint``). The part files are merged into ``metadata.jsonl``
at the end (idempotently: records are keyed by image path). An OUTPUT that cannot be written (read-only, full) stops
the run with an :class:`OutputError` that names the folder and the cause; what is finished stays recorded.

With ``--caption-model JANUS_FOLDER`` every image is also captioned by Janus (jodi_core.captioning: the Janus Caption
node's presets, greedy decoding, one image per call, so a caption does not depend on the batch or the shard); the
record gets ``"caption": {"<folder name>": "<text>"}`` beside the captions of other models already there. An image
whose caption under that name exists is done for captions; ``--captions-only`` fills in captions alone, without
loading Jodi. A window of images is captioned first (each caption recorded at once), then labelled; a caption that
fails goes to ``errors.jsonl`` (with ``caption_model``) and the image's maps are written all the same. On one GPU the
two models stay loaded together when they fit, else take turns (:class:`ModelPlacement`). Under Ray the captions are a
stage of their own (:class:`RayCaptioner`, Janus actors) before the perception actors, which never load Janus.

With several workers (torchrun ranks on several nodes, Ray workers on a cluster) OUTPUT must be one shared folder:
every worker writes its own files and part file there.

Modules: ``folders`` (output layout constants, errors, allowed roots), ``config`` (AnnotateConfig, the summary, a
work item), ``planning`` (names, seeds, existing records, what is left), ``output`` (atomic writes, part files, the
merge), ``annotator`` (models, their placement, the labelling and captioning of batches), ``engines`` (one process and
torchrun), ``ray_engine`` (Ray Data stages), ``cli`` (the command line).
"""

from .annotator import Annotator, ModelPlacement, load_caption_model, load_models, read_image
from .cli import build_parser, config_from_args, main_annotate
from .config import AnnotateConfig, AnnotateSummary, WorkItem
from .engines import annotate
from .folders import FINGERPRINT_KEY, ROOTS_ENV, STATE_DIR, OutputError, extra_roots, resolve_inside
from .output import merge_outputs
from .planning import fingerprint, image_seed, known_records, label_path, part_name, plan_work, shard
from .ray_engine import COUNT_COLUMNS, WORK_COLUMN, RayAnnotator, RayCaptioner, RayStage, plan_batches

__all__ = [
    "AnnotateConfig", "AnnotateSummary", "Annotator", "COUNT_COLUMNS", "FINGERPRINT_KEY", "ModelPlacement",
    "OutputError", "ROOTS_ENV", "RayAnnotator", "RayCaptioner", "RayStage", "STATE_DIR", "WORK_COLUMN", "WorkItem",
    "annotate", "build_parser", "config_from_args", "extra_roots", "fingerprint", "image_seed", "known_records",
    "label_path", "load_caption_model", "load_models", "main_annotate", "merge_outputs", "part_name", "plan_batches",
    "plan_work", "read_image", "resolve_inside", "shard",
]
