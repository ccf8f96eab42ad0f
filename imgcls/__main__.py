from imgcls import interrupts

# Ctrl-C while the CLI imports: held (not lost), raised once it is safe; see interrupts.hold
interrupts.hold()

from imgcls.cli import main  # noqa: E402

main()
