"""A synthetic EGD-CXR + MIMIC-CXR dataset in the real layout, with a documented shortcut.

The package holds :func:`synthesize` and :class:`SynthResult` (:mod:`.generate`), the
table-level draws (:mod:`.plan`: patients, studies, markers, storage choices, master-sheet
rows), the per-image work (:mod:`.draw`), and the modules named below.

``synthesize(out)`` writes::

    out/egd-cxr/master_sheet.csv      59 columns (schema.MASTER_SHEET_COLUMNS), one row per image
    out/egd-cxr/fixations.csv         37 columns (schema.GAZE_COLUMNS), one row per fixation
    out/egd-cxr/bounding_boxes.csv    dicom_id, bbox_name, x1, x2, y1, y2 (original pixels)
    out/mimic-cxr/files/pXX/p<patient_id>/s<study_id>/<dicom_id>.dcm

and nothing else (this docstring is the dataset's documentation: no README goes into the
data folder, whose DVC hash must only change with the data). The same arguments give
byte-identical files on any machine with the pinned numpy, scipy, pydicom and pylibjpeg
versions (``requirements.lock``): every random draw comes from ``seed`` (one stream for
the tables, one per image, so ``workers`` changes nothing), the DICOM UIDs are derived
from the ids, nothing is read from the clock, and all image arithmetic is float64 before
quantising to 12 bits.

Contents
--------
- Patients: 8-digit ids starting 10-19, one class each (Normal / CHF / pneumonia,
  balanced), sex, an ``anchor_age`` band such as ``20 - 30``; about a fifth have two or
  three studies (8-digit ids starting 5), one PA image each, with MIMIC-style DICOM ids
  (``24c7496c-d7635dfe-b8e0b87f-d818affc-78ff7cf4``). The master sheet is grouped by class
  (CHF, pneumonia, Normal) like the release. Diagnoses, findings, CheXpert labels and the
  exam indication (with quoted commas and line breaks) agree with the class
  (:mod:`.records`).
- Images (:mod:`.anatomy`, :mod:`.phantom`): chest phantoms, heights 240-272 and widths
  208-256 at the default ``image_size`` 256 (scaled proportionally for other sizes). CHF:
  a larger heart and hazy bases; pneumonia: a patchy opacity in one lung; Normal:
  neither. Stored as described in :mod:`.dicom` (12-bit, MONOCHROME1 and 2, rescale and
  window tags, four transfer syntaxes).
- Gaze (:mod:`.gaze`): 30-60 fixations per image in sessions of up to 30 images,
  on the finding for CHF and pneumonia, scanning both lungs for Normal, never on the
  marker.
- ``bounding_boxes.csv``: for every image ``right lung``, ``left lung`` (the patient's
  sides: the right lung is on the image's left), ``right costophrenic angle``, ``left
  costophrenic angle``, ``cardiac silhouette``; the ground truth of the findings,
  ``finding: cardiomegaly``, ``finding: right basal haze`` and ``finding: left basal
  haze`` (CHF) or ``finding: opacity`` (pneumonia); and ``marker`` where the marker is.

The shortcut
------------
Each image carries a burned-in marker, a bright square of ``marker_size`` (default 4 %)
of the shorter image side, near one of three corners, one per class: ``Normal``
top-left, ``CHF`` top-right, ``pneumonia`` bottom-left. For train and validation images
the marker sits in its class's corner for a fraction ``shortcut_strength`` of the images
of each class (exactly, up to rounding) and in one of the two other corners otherwise;
for test images the corner is balanced against the label, so it agrees with the label
for a third of them (chance). A classifier that learns the marker scores high on
validation and drops on test; one that looks where the radiologist looked does not.
``shortcut_strength=0`` draws no marker at all (and no ``marker`` box); strengths below
1/3 make the marker anti-informative, which is allowed but rarely what you want.

Which patients are "test" is decided by :func:`cxrgaze.data.split.split_patients` with
``split_config`` on the (patient_id, label) table of the images that ``prepare`` will
keep (the faulty entries below are left out and do not change it). **The shortcut is
aligned to that split config**: the pipeline must split with the same config (the
``split`` section of ``params.yaml``, seed 42, 55/12/33 by default). If you change the
split seed or fractions, regenerate the data with the same ``split_config``, or the test
set carries the shortcut too.

Deliberate faults (``faults=True``, the default)
------------------------------------------------
Five extra images, each an extra study of a different patient who also has good images
with the same label (so the kept patients, their labels and the split are unchanged):
``truncated_dicom`` (the file is cut short inside the pixel data), ``missing_file`` (a
master-sheet row whose DICOM does not exist), ``no_fixations`` (no gaze rows),
``no_label`` (``Normal``, ``CHF``, ``pneumonia`` all 0) and ``no_pixel_data`` (a valid
DICOM without Pixel Data). Like the real release, ``fixations.csv`` also holds readings
of calibration screens under DICOM_IDs that are not in the master sheet (a shown image's
id without its last five characters, about one per session). ``SynthResult.faults`` and
``SynthResult.orphan_gaze_ids`` name them.
"""

from cxrgaze.data.synth.generate import SynthResult, synthesize
from cxrgaze.data.synth.plan import CORNER_CENTRES, CORNERS, FAULT_KINDS, MASTER_ORDER

__all__ = ["CORNERS", "CORNER_CENTRES", "FAULT_KINDS", "MASTER_ORDER", "SynthResult", "synthesize"]
