# Loaded by unicorn-shim into every Ruby process it starts (RUBYOPT=-r...):
# when a master or a worker fails, tells the shim why in one line — the
# exception, or the server's own error line — so that a failed reload says
# "config.ru:3: boom (RuntimeError)" instead of only "exited". The shim reads
# nothing of the journal for this: it works under any User=.
# Outside the shim (no UNICORN_SHIM_READY_SOCKET) it does nothing.
module UnicornShimReport
  PATH = ENV["UNICORN_SHIM_READY_SOCKET"]
  LIMIT = 5            # reports per process: a crash, not a log stream
  @sent = 0
  @last_write = nil

  class << self
    attr_accessor :last_write

    def say(text)
      return unless PATH && @sent < LIMIT
      @sent += 1
      require "socket"
      sock = Socket.new(:UNIX, :DGRAM)
      sock.send("error ppid=#{Process.ppid} #{text.strip[0, 480]}", 0, Socket.sockaddr_un(PATH))
    rescue StandardError, ScriptError
      # the shim is gone or restarting; never disturb the server
    ensure
      sock&.close
    end

    def where(frame)
      frame.to_s[/\A[^:]+:\d+/]
    end

    def describe(error)
      first = error.message.to_s.lines.first.to_s.strip
      return "#{first} (#{error.class})" if error.is_a?(SyntaxError)   # the message has file:line
      at = where(error.backtrace&.first)
      "#{first} (#{error.class})#{at ? " at #{at}" : ""}"
    end

    # Logger's ERROR/FATAL lines ("E, [time #pid] ERROR -- : boom (RuntimeError)"
    # followed by the backtrace in the same write): Unicorn logs a worker's failure
    # so, then leaves with exit!, which runs no at_exit.
    def saw(text)
      return if text.empty?
      @last_write = text
      lines = text.lines
      head = lines.first.to_s
      return unless head =~ /\A[EF], \[[^\]]*\]\s+\w+ -- [^:]*: (.*)/
      message = Regexp.last_match(1).strip
      return if message.start_with?("reaped #<Process::Status")   # a master noting a death, not its cause
      at = lines[1..].map { |l| where(l.strip) }.compact.first
      say(at ? "#{message} at #{at}" : message)
    end
  end

  # Puma's own error lines ("[pid] ! Unable to start worker") go to stdout, written
  # inside the rescue that caught the exception: $! is that exception then.
  def self.saw_stdout(text)
    head = text.lines.first.to_s.sub(/\A\[\d+\] /, "")
    return unless head.start_with?("! ")
    error = $!
    told = error && !error.is_a?(SystemExit) ? " (#{describe(error)})" : ""
    say("#{head[2..].strip}#{told}")
  end

  # A module to prepend to a stream: each write is shown to `reader` first; nothing
  # the reporter does may disturb the server's own output.
  def self.tee(reader)
    Module.new do
      define_method(:write) do |*args|
        begin
          UnicornShimReport.public_send(reader, args.join)
        rescue StandardError
          nil
        end
        super(*args)
      end
    end
  end
end

if UnicornShimReport::PATH
  $stderr.singleton_class.prepend(UnicornShimReport.tee(:saw))
  $stdout.singleton_class.prepend(UnicornShimReport.tee(:saw_stdout))
  at_exit do
    error = $!
    if error.is_a?(SystemExit)
      last = UnicornShimReport.last_write.to_s.lines.map(&:strip).reject(&:empty?).first
      # with nothing written, an exit status alone says less than what was sent before
      UnicornShimReport.say("#{last} (exit #{error.status})") if last && !error.success?
    elsif error && !error.is_a?(Interrupt) && !error.is_a?(SignalException)
      UnicornShimReport.say(UnicornShimReport.describe(error))
    end
  end
end
