"""``python -m dspexctl``: the same CLI as the ``dspexctl`` script."""

from dspexctl.cli import main

main(prog_name="dspexctl")
