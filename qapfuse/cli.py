"""The ``qapfuse`` command. PLACEHOLDER: being written."""


def main(argv=None) -> int:
    raise NotImplementedError
