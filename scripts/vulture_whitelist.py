"""Names vulture cannot see used: called by a framework, read by a template or a serialiser,
or part of a standard's table. `vulture` (config in pyproject.toml) reads this file with src/.

Each entry says who uses the name. Add to it only what something outside Python's own
calls uses; delete code that nothing uses. Never executed.
"""

from vulture.whitelist_utils import Whitelist

_ = Whitelist()

# pydantic and pydantic-settings: class configuration and the sources hook, which is called
# with these keyword arguments.
_.model_config
_.settings_customise_sources
_.settings_cls
_.dotenv_settings
_.file_secret_settings

# pydantic response and settings fields, serialised to JSON or read from TOML by name.
_.next_cursor  # api/schemas.py
_.series_count
_.stored_instance_count
_.changed
_.event_name
_.requested_procedure_priority  # config/triage.py: triage rule conditions
_.scheduled_priority
_.department

# Dataclass fields serialised whole (asdict, JSON reports, webhook bodies), read by tests or
# benchmarks rather than by the node itself.
_.newest_seq  # audit/checkpoint.py
_.rule_index  # config/labels.py
_.series_used  # inference/select.py
_.throughput_by_batch  # optimization/benchmark.py
_.latency_ratio_vs_torch_fp32
_.cpu_flags  # optimization/openvino_build.py
_.cosine_mean  # optimization/parity.py
_.onnx_sha256  # optimization/tensorrt_build.py
_.triage_priority  # pipeline/notify.py: webhook body
_.triage_rule
_.study_instance_uid  # reports/content.py, reports/reader.py
_.algorithm_parameters
_.library_images
_.prevalence  # validation/metrics.py: metrics.json
_.sensitivity
_.specificity
_.confusion
_.user_identity  # scp/negotiation.py: parsed from the A-ASSOCIATE-RQ, checked by tests

# Jinja templates of the operator console (console/templates/*.html).
_.can_operate
_.age
_.time_to_sr
_.pages
_.earlier_runs
_.can_reprocess
_.can_complete
_.next_before

# SQLAlchemy: a TypeDecorator's hooks, the declarative base's type map, Alembic revision
# modules, ORM columns written by the node and read by SQL.
_.impl
_.cache_ok
_.process_bind_param
_.process_result_value
_.type_annotation_map
_.down_revision
_.branch_labels
_.depends_on
_.downgrade
_.replaced_at
_.finished_at
_.isolation_level  # sqlite3 connection attribute (store/db.py)

# Attributes set on other libraries' objects: onnxruntime SessionOptions, timm model
# registration, logging records, uvicorn's Server, pynetdicom's AE, reportlab's config.
_.intra_op_num_threads
_.inter_op_num_threads
_.execution_mode
_.graph_optimization_level
_.pretrained  # timm's model entry point signature
_.default_cfg
_.msg
_.install_signal_handlers
_.should_exit
_.acse_timeout
_.dimse_timeout
_.network_timeout
_.connection_timeout
_.requested_contexts
_.useA85
_.forward  # torch.nn.Module
_.get_next  # onnxruntime CalibrationDataReader
_.rewind

# pydicom Dataset attributes (DICOM keywords) set when building SR, SC, PDF and KOS objects.
_.AcquisitionDateTime
_.BurnedInAnnotation
_.ConversionType
_.DerivationDescription
_.DeviceSerialNumber
_.DocumentTitle
_.EncapsulatedDocument
_.EncapsulatedDocumentLength
_.ImageComments
_.ImplementationClassUID
_.InstanceCreationDate
_.InstanceCreationTime
_.InstanceNumber
_.InstitutionName
_.Laterality
_.MIMETypeOfEncapsulatedDocument
_.Manufacturer
_.ManufacturerModelName
_.MediaStorageSOPInstanceUID
_.PatientOrientation
_.ReferencedFrameNumber
_.ReferencedSOPClassUID
_.SeriesDescription
_.SeriesNumber
_.SoftwareVersions
_.SourceImageSequence
_.SourceInstanceSequence
_.SpecificCharacterSet
_.StationName

# Standard tables kept whole, like pynetdicom's status.py: DIMSE statuses (PS3.7 C),
# A-ABORT reasons (PS3.8 9.3.8) and ATNA event outcomes (RFC 3881).
_.out_of_resources
_.sop_class_not_supported
_.unrecognised_pdu_parameter
_.unexpected_pdu_parameter
_.major_failure

# Used by tests (and meant as API), not by the node's own code paths.
_.int8  # inference/backends/cpu.py: CpuCapabilities.int8
_.classify_images  # inference/classifier.py
_.undelivered  # pipeline/notify.py
_.cancel  # pipeline/queue.py
_.filled_centre  # reports/summary_card.py
_.pending_connections  # scp/receiver.py
_.is_success  # scp/status.py
_.send_due  # scp/exporter.py
_.commit  # store/spool.py: IncomingInstance.commit

# Counted but never reported (AssociationInfo.echoes): left for the lead to wire or drop.
_.echoes

# Read through dataclasses.asdict (the export-triton command's JSON output).
_.config_path  # optimization/triton_repo.py: TritonRepository.config_path
_.holds  # pipeline/cluster.py: ClusterSingleton.holds (tests; the metric says the same)
_.takeovers  # pipeline/cluster.py: ClusterSingleton.takeovers (tests)
