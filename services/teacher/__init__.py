"""The teacher service: scores a student's tokens and judges its turns over HTTP."""
