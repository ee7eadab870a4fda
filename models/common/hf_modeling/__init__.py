"""The modeling code every plait export ships (beside each family's ``hf_mixer.py``):
plain PyTorch files for transformers' ``trust_remote_code``, never imported by plait itself
(``modeling_plait`` imports ``plait_mixers``, which the export writes). They are read and
copied by models/common/hf_code.py; tests load an assembled copy."""
