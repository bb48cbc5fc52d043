from lssupervisor.testing.standin.cli import main

main()
