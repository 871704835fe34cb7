"""What the synthetic master sheet says about each image (see :mod:`cxrgaze.data.synth`).

Diagnoses, report findings and CheXpert labels agree with the image's class the way the
real release's do: CHF rows carry ``Heart failure, unspecified`` / ``I50.9`` (or a close
variant), an enlarged cardiac silhouette and edema; pneumonia rows ``Pneumonia,
unspecified organism`` / ``J18.9``, an opacity or consolidation; Normal rows a
non-pulmonary complaint, ``normal_anatomically`` and CheXpert ``no_finding``. The exam
indication is free text with ``___`` for what de-identification removed, commas, and
sometimes line breaks (so the CSV holds quoted newlines, as the real one does).
"""

from __future__ import annotations

import numpy as np

from cxrgaze.data.schema import CHEXPERT_COLUMNS, FINDING_COLUMNS

AGE_BANDS: tuple[str, ...] = ("20 - 30", "30 - 40", "40 - 50", "50 - 60", "60 - 70", "70 - 80")

PRIMARY_DX: dict[str, tuple[tuple[str, str], ...]] = {
    "CHF": (
        ("Heart failure, unspecified", "I50.9"),
        ("Heart failure, unspecified", "I50.9"),
        ("Acute on chronic diastolic (congestive) heart failure", "I50.33"),
        ("Acute on chronic systolic (congestive) heart failure", "I50.23"),
        ("Hypertensive heart disease with heart failure", "I11.0"),
    ),
    "pneumonia": (
        ("Pneumonia, unspecified organism", "J18.9"),
        ("Pneumonia, unspecified organism", "J18.9"),
        ("Lobar pneumonia, unspecified organism", "J18.1"),
        ("Bacterial pneumonia, unspecified", "J15.9"),
    ),
    "Normal": (
        ("Chest pain, unspecified", "R07.9"),
        ("Other chest pain", "R07.89"),
        ("Syncope and collapse", "R55"),
        ("Dizziness and giddiness", "R42"),
        ("Palpitations", "R00.2"),
        ("Shortness of breath", "R06.02"),
    ),
}
SECONDARY_DX: dict[str, tuple[tuple[str, str], ...]] = {
    "CHF": (
        ("Essential (primary) hypertension", "I10"),
        ("Unspecified atrial fibrillation", "I48.91"),
        ("Chronic kidney disease, unspecified", "N18.9"),
        ("Type 2 diabetes mellitus without complications", "E11.9"),
        ("Long term (current) use of anticoagulants", "Z79.01"),
        ("Hyperlipidemia, unspecified", "E78.5"),
    ),
    "pneumonia": (
        ("Sepsis, unspecified organism", "A41.9"),
        ("Hypoxemia", "R09.02"),
        ("Fever, unspecified", "R50.9"),
        ("Chronic obstructive pulmonary disease, unspecified", "J44.9"),
        ("Acute respiratory failure with hypoxia", "J96.01"),
        ("Essential (primary) hypertension", "I10"),
    ),
    "Normal": (
        ("Essential (primary) hypertension", "I10"),
        ("Hyperlipidemia, unspecified", "E78.5"),
        ("Anxiety disorder, unspecified", "F41.9"),
        ("Tobacco use", "Z72.0"),
        ("Type 2 diabetes mellitus without complications", "E11.9"),
    ),
}
COMPLAINTS: dict[str, tuple[str, ...]] = {
    "CHF": ("dyspnea on exertion", "bilateral leg swelling, orthopnea", "known CHF, worsening shortness of breath",
            "weight gain, dyspnea", "shortness of breath"),
    "pneumonia": ("fever, productive cough", "cough and fever", "hypoxia, cough", "leukocytosis, fever, chills",
                  "shortness of breath"),
    "Normal": ("chest pain", "syncope", "s/p fall", "palpitations", "dizziness, chest pressure", "shortness of breath"),
}
QUESTIONS: tuple[str, ...] = (
    "evaluate for pneumonia", "eval for acute cardiopulmonary process", "r/o pna", "assess for edema, effusion",
    "please evaluate for infiltrate", "evaluate for acute process",
)
SEX_WORD = {"M": "man", "F": "woman"}


def exam_indication(rng: np.random.Generator, label: str, sex: str) -> str:
    """A de-identified exam indication; about a third hold line breaks."""
    complaint = str(rng.choice(COMPLAINTS[label]))
    question = str(rng.choice(QUESTIONS))
    form = int(rng.integers(0, 4))
    if form == 0:
        return f"___-year-old {SEX_WORD[sex]} with {complaint}, {question}."
    if form == 1:
        return f"History: ___{sex} with {complaint}\nQuestion: {question}"
    if form == 2:
        return f"___{sex} with {complaint}.  {question.capitalize()}."
    return f"{complaint.capitalize()}.\n\n{question.capitalize()}, please."


def diagnoses(rng: np.random.Generator, label: str) -> list[str]:
    """``dx1, dx1_icd, ..., dx9, dx9_icd``: one primary and up to three secondary, then empty."""
    primary = PRIMARY_DX[label][int(rng.integers(len(PRIMARY_DX[label])))]
    pool = SECONDARY_DX[label]
    extra = rng.choice(len(pool), size=int(rng.integers(0, 4)), replace=False)
    out = [*primary, *(text for i in extra for text in pool[int(i)])]
    return out + [""] * (18 - len(out))


def findings(rng: np.random.Generator, label: str) -> dict[str, str]:
    """The report-derived finding columns (0/1) for an image of class ``label``."""
    values = dict.fromkeys(FINDING_COLUMNS, 0)
    r = rng.random(6)
    if label == "CHF":
        values.update(enlarged_cardiac_silhouette=1, pulmonary_edema__hazy_opacity=1,
                      vascular_redistribution=int(r[0] < 0.5), pleural_effusion_or_thickening=int(r[1] < 0.3),
                      linear__patchy_atelectasis=int(r[2] < 0.15))
    elif label == "pneumonia":
        consolidation = r[0] < 0.6
        values.update(consolidation=int(consolidation), linear__patchy_atelectasis=int(r[2] < 0.2),
                      pleural_effusion_or_thickening=int(r[3] < 0.15), lobar__segmental_collapse=int(r[4] < 0.05))
        opacity = "not_otherwise_specified_opacity___pleural__parenchymal_opacity__"
        values[opacity] = int(not consolidation or r[1] < 0.3)
    else:
        values.update(normal_anatomically=1, hyperaeration=int(r[0] < 0.05), elevated_hemidiaphragm=int(r[1] < 0.05))
    return {k: str(v) for k, v in values.items()}


def chexpert(rng: np.random.Generator, label: str, consolidation: bool) -> dict[str, str]:
    """CheXpert labeler output: 1 positive, 0 negative, -1 uncertain, empty unmentioned."""
    values = dict.fromkeys(CHEXPERT_COLUMNS, "")
    r = rng.random(8)

    def put(name: str, value: str) -> None:
        values[f"{name}__chx"] = value

    if label == "CHF":
        put("cardiomegaly", "1")
        put("edema", "-1" if r[0] < 0.2 else "1")
        put("pleural_effusion", "1" if r[1] < 0.3 else ("-1" if r[1] < 0.4 else ""))
        put("enlarged_cardiomediastinum", "1" if r[2] < 0.3 else "")
        put("lung_opacity", "1" if r[3] < 0.3 else "")
        put("support_devices", "1" if r[4] < 0.2 else "")
        put("pneumothorax", "0" if r[5] < 0.3 else "")
    elif label == "pneumonia":
        put("pneumonia", "-1" if r[0] < 0.3 else "1")
        put("lung_opacity", "1")
        put("consolidation", "1" if consolidation else "")
        put("atelectasis", "-1" if r[1] < 0.2 else "")
        put("pleural_effusion", "0" if r[2] < 0.4 else "")
        put("pneumothorax", "0" if r[3] < 0.3 else "")
    else:
        put("no_finding", "1")
        put("pneumothorax", "0" if r[0] < 0.5 else "")
        put("pleural_effusion", "0" if r[1] < 0.5 else "")
        put("pneumonia", "0" if r[2] < 0.3 else "")
        put("edema", "0" if r[3] < 0.2 else "")
        put("cardiomegaly", "0" if r[4] < 0.2 else "")
    return values
