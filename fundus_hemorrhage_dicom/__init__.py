"""DICOM gateway of the haemorrhage service (issue 21; docs/dicom.md): Orthanc's stable studies -> the Triton
ensemble (a client, over gRPC) -> SEG + Comprehensive SR + Secondary Capture overlay back into the same study.

    source    OP photo checked and decoded, or refused with a reason
    seg, sr, capture, results   the outputs of one photo (highdicom), ids their deterministic UIDs, codes
    orthanc   the REST calls; gateway the loop and its state; pacs Orthanc from deploy/orthanc/ and make run-pacs
    camera, send   synthetic camera files, C-STORE / STOW-RS, for tests, the benchmark and trying it out
"""
