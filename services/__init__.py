"""Services of SAGE-OPD: the environment service and the teacher service."""
