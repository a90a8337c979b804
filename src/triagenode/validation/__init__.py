"""Local validation before go-live: evaluate on labelled studies, fit a site calibration,
measure shadow-mode results, watch for drift.

- :mod:`~triagenode.validation.dataset`: study folders and the labels CSV;
- :mod:`~triagenode.validation.scoring`: the node's pipeline over them (or its stored results);
- :mod:`~triagenode.validation.evaluate`: metrics, calibration fit and outputs;
- :mod:`~triagenode.validation.metrics`: AUC, sensitivity, specificity, PPV, NPV with
  stratified bootstrap intervals;
- :mod:`~triagenode.validation.calibration`: Platt, temperature and isotonic fits, operating points;
- :mod:`~triagenode.validation.calibration_file`: the versioned file the node loads;
- :mod:`~triagenode.validation.report`: ``report.html`` and its figures;
- :mod:`~triagenode.validation.drift`: PSI and KS against the validation-time reference.
"""
