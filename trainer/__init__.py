"""ftlab: local fine-tuning with the hosted workflow."""
