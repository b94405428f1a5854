# unicorn-shim's failure reporter, loaded at interpreter start (through
# rubygems/defaults/operating_system.rb) in a master the shim started and so in
# its workers: when a master or a worker fails, it tells the shim why in one
# line, the exception and where it was raised, so that a failed reload says
# "boom (RuntimeError) at config.ru:3" instead of only "exited". It reads and
# wraps no output: it catches the error where the process ends with it —
#   at_exit           an exception that ends the process (a master's boot), or the
#                     one a failing `exit` was called for (Bundler's friendly errors,
#                     Puma's "! Unable to start worker": SystemExit#cause);
#   Kernel#exit!      Unicorn's worker that failed to boot logs and leaves with exit!;
#   require           Bundler 2.6's `bundle exec` requires bundler/setup from
#                     RubyGems itself ($BUNDLER_SETUP), where at_exit sees no $!.
# The shim reads nothing of the journal for this: it works under any User=.
require_relative "unicorn_shim_channel"

module UnicornShimReport
  LIMIT = 5            # reports per process: a crash, not a log stream
  @sent = 0

  def self.say(text)
    return unless @sent < LIMIT
    @sent += 1
    UnicornShimChannel.say("error #{text.to_s.strip[0, 480]}")
  end

  def self.where(frame)
    frame.to_s[/\A[^:]+:\d+/]
  end

  def self.describe(error)
    first = error.message.to_s.lines.first.to_s.strip
    return "#{first} (#{error.class})" if error.is_a?(SyntaxError)   # the message has file:line
    at = where(error.backtrace&.first)
    "#{first} (#{error.class})#{at ? " at #{at}" : ""}"
  end

  # What a process ending with `error` failed of, if it failed.
  def self.failed(error)
    error = error.cause if error.is_a?(SystemExit) && !error.success?
    return if error.nil? || error.is_a?(SystemExit) || error.is_a?(SignalException)
    say(describe(error))
  rescue StandardError
    nil
  end

  module Exits
    private

    def exit!(*args)
      UnicornShimReport.failed($!) if $! && args.first != true && args.first != 0
      super
    end

    def exec(*args)
      UnicornShimChannel.pass_on(args.last)
      super
    end
  end

  module BundlerSetup
    private

    def require(path)
      super
    rescue Exception => e # rubocop:disable Lint/RescueException - reported, then raised as it was
      UnicornShimReport.failed(e) if path == ENV["BUNDLER_SETUP"]
      raise
    end
  end
end

if UnicornShimChannel::IO_
  Kernel.prepend(UnicornShimReport::Exits)
  Kernel.prepend(UnicornShimReport::BundlerSetup) if ENV["BUNDLER_SETUP"]
  at_exit { UnicornShimReport.failed($!) if $! }
end
