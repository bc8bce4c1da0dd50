"""Site data: reading records, encoding them for a model, batching, and the built-in tasks."""

from fedsilo.data.batching import collate, iterate_batches
from fedsilo.data.encode import IGNORE_INDEX, Example, encode_prompt, encode_record, encode_records
from fedsilo.data.icd10 import (
    SPECIALTIES,
    SYSTEM_PROMPT,
    IcdCode,
    SiteData,
    TaskData,
    build_icd10_task,
    default_chapters,
    icd10_prompt,
    load_icd10_codes,
)
from fedsilo.data.partition import partition_by_group, partition_dirichlet
from fedsilo.data.records import ChatRecord, DataError, Record, TextRecord, load_records

__all__ = [
    "IGNORE_INDEX",
    "SPECIALTIES",
    "SYSTEM_PROMPT",
    "ChatRecord",
    "DataError",
    "Example",
    "IcdCode",
    "Record",
    "SiteData",
    "TaskData",
    "TextRecord",
    "build_icd10_task",
    "collate",
    "default_chapters",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "icd10_prompt",
    "iterate_batches",
    "load_icd10_codes",
    "load_records",
    "partition_by_group",
    "partition_dirichlet",
]
