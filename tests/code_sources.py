"""Finding codes of the shipped label sets that pydicom's copy of PS3.16 does not list.

pydicom's concept dictionary (``pydicom.sr.codedict``) is generated from the DICOM standard's
PS3.16 context groups, so a code found there with a CID is current in DICOM. The findings
below appear in no PS3.16 context group; they are SNOMED CT International concepts, written
here with their fully specified name (the source checked), and used in the DICOM ``SCT``
scheme as PS3.16 section 8 allows for any SNOMED CT concept. A morphology code
("(morphologic abnormality)") is never a finding code: none is used.
"""

from __future__ import annotations

# (scheme, value) -> (code meaning as written in the SR, SNOMED CT fully specified name)
SNOMED_FINDINGS: dict[tuple[str, str], tuple[str, str]] = {
    ("SCT", "233604007"): ("Pneumonia", "Pneumonia (disorder)"),
    ("SCT", "1386000"): ("Intracranial hemorrhage", "Intracranial hemorrhage (disorder)"),
    ("SCT", "71642004"): ("Fracture of skull", "Fracture of skull (disorder)"),
    ("SCT", "432504007"): ("Cerebral infarction", "Cerebral infarction (disorder)"),
    ("SCT", "24700007"): ("Multiple sclerosis", "Multiple sclerosis (disorder)"),
    ("SCT", "230745008"): ("Hydrocephalus", "Hydrocephalus (disorder)"),
    ("SCT", "254701007"): (
        "Basal cell carcinoma of skin",
        "Basal cell carcinoma of skin (disorder)",
    ),
    ("SCT", "4855003"): ("Diabetic retinopathy", "Retinopathy due to diabetes mellitus (disorder)"),
    ("SCT", "23986001"): ("Glaucoma", "Glaucoma (disorder)"),
    ("SCT", "267718000"): (
        "Age-related macular degeneration",
        "Age-related macular degeneration (disorder)",
    ),
}
