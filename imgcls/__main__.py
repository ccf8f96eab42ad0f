from imgcls.cli import main

main()
